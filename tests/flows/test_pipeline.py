"""The pipeline flow runs for real under a Prefect test harness, with MLflow in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import mlflow
from dicomops.config import PipelineConfig, PreprocessConfig
from dicomops.deid import scan_for_phi
from dicomops.tracking import dvc_directory_hash
from flows.pipeline import pipeline
from flows.preprocess import preprocess

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_pipeline_runs_ingest_and_preprocess_with_lineage(clean_corpus: Path, mlflow_env: str,
                                                         tmp_path: Path) -> None:
    config = PipelineConfig(experiment="pipeline-test", preprocess=PreprocessConfig(crop_xy=256))
    result = pipeline(src=clean_corpus, config=config)
    client = mlflow.tracking.MlflowClient(mlflow_env)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["data_dvc_md5"] == dvc_directory_hash(clean_corpus) == result["data_dvc_md5"]
    assert run.data.tags["version.pydicom"].startswith("3.")
    assert run.data.params["synth.seed"] == str(PipelineConfig().synth.seed)
    n_files = sum(1 for p in clean_corpus.rglob("*") if p.is_file())
    assert run.data.metrics["input_files"] == n_files
    assert Path(result["work"]) == tmp_path / "work"

    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert {c.info.run_name for c in children} == {"ingest", "preprocess"}
    prep = client.get_run(result["preprocess_run_id"])
    assert prep.data.metrics["preprocess.series"] == 8 and prep.data.metrics["preprocess.failed"] == 0
    artifacts = {a.path for a in client.list_artifacts(prep.info.run_id, "preprocess")}
    assert {"preprocess/samples.png", "preprocess/features.parquet"} <= artifacts

    index = pd.read_parquet(tmp_path / "work/preprocessed/index.parquet")
    assert len(index) == 8 and set(index.vendor) == {"siemens", "ge", "philips", "canon"}
    assert (index[index.label == 1].positive_slices > 0).all()
    slabs = pd.read_parquet(tmp_path / "work/preprocessed/slabs.parquet")
    assert slabs.slice_label.sum() == index.positive_slices.sum()

    phi = pd.read_csv(clean_corpus / "phi.csv", keep_default_na=False)
    assert scan_for_phi(tmp_path, set(phi.value)) == []

    again = preprocess(work=tmp_path / "work", config=config.preprocess)
    assert again["computed"] == 0 and again["cached"] == 8
