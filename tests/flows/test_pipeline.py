"""The pipeline flow runs for real under a Prefect test harness, with MLflow in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import mlflow
from dicomops.config import PipelineConfig, PreprocessConfig, SynthConfig, TrainConfig
from dicomops.deid import scan_for_phi
from dicomops.synthetic import generate_corpus
from dicomops.tracking import dvc_directory_hash
from flows.pipeline import pipeline
from flows.preprocess import preprocess

pytestmark = pytest.mark.usefixtures("prefect_harness")
N = 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pipeline") / "corpus"
    generate_corpus(out, SynthConfig(patients=N, seed=23, fault_rate=0.0, matrix=128, slices=12, workers=1))
    return out


def test_pipeline_runs_every_stage_with_lineage(corpus: Path, mlflow_env: str, tmp_path: Path) -> None:
    clean_corpus = corpus
    config = PipelineConfig(
        experiment="pipeline-test",
        preprocess=PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), crop_xy=160, workers=1),
        train=TrainConfig(epochs=1, input_size=32, num_workers=0, model_name="pipeline-test-model"))
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
    assert {c.info.run_name for c in children} == {"ingest", "preprocess", "train"}
    prep = client.get_run(result["preprocess_run_id"])
    assert prep.data.metrics["preprocess.series"] == N and prep.data.metrics["preprocess.failed"] == 0
    assert client.get_model_version("pipeline-test-model", result["model_version"]).run_id == result["train_run_id"]
    artifacts = {a.path for a in client.list_artifacts(prep.info.run_id, "preprocess")}
    assert {"preprocess/samples.png", "preprocess/features.parquet"} <= artifacts

    index = pd.read_parquet(tmp_path / "work/preprocessed/index.parquet")
    assert len(index) == N and set(index.vendor) == {"siemens", "ge", "philips", "canon"}
    assert (index[index.label == 1].positive_slices > 0).all()
    slabs = pd.read_parquet(tmp_path / "work/preprocessed/slabs.parquet")
    assert slabs.slice_label.sum() == index.positive_slices.sum()

    phi = pd.read_csv(clean_corpus / "phi.csv", keep_default_na=False)
    assert scan_for_phi(tmp_path, set(phi.value)) == []

    again = preprocess(work=tmp_path / "work", config=config.preprocess)
    assert again["computed"] == 0 and again["cached"] == N
