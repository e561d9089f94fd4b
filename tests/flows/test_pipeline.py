"""The pipeline flow runs for real under a Prefect test harness, with MLflow in tmp_path."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest

import mlflow
from dicomops.config import ExportConfig, PipelineConfig, PreprocessConfig, SynthConfig, TrainConfig
from dicomops.deid import scan_for_phi
from dicomops.synthetic import generate_corpus
from dicomops.tracking import dvc_directory_hash
from flows.pipeline import pipeline
from flows.preprocess import preprocess
from tests.flows.test_segment_flow import TINY_SEGMENTER

pytestmark = pytest.mark.usefixtures("prefect_harness")
N = 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pipeline") / "corpus"
    generate_corpus(out, SynthConfig(patients=N, seed=23, fault_rate=0.0, matrix=128, slices=12, workers=1))
    return out


def test_pipeline_runs_every_stage_with_lineage_and_a_rerun_skips_every_stage(
        corpus: Path, mlflow_env: str, tmp_path: Path) -> None:
    clean_corpus = corpus
    config = PipelineConfig(
        experiment="pipeline-test",
        preprocess=PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), crop_xy=160, workers=1),
        train=TrainConfig(epochs=1, input_size=32, num_workers=0, model_name="pipeline-test-model"),
        segment=TINY_SEGMENTER.model_copy(update={"model_name": "pipeline-test-segmenter"}),
        # A one-epoch model on 20 series scores near chance: the INT8 AUC check is exercised in
        # tests/unit/test_export.py, not by this model.
        export=ExportConfig(parity_samples=16, calibration_samples=16, max_batch=8, preferred_batch_sizes=(8,),
                            int8_max_auc_drop=1.0))
    start = time.perf_counter()
    result = pipeline(src=clean_corpus, config=config)
    first_seconds = time.perf_counter() - start
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
    assert {c.info.run_name for c in children} == {"ingest", "preprocess", "train", "segment"}
    segmenter = client.get_model_version("pipeline-test-segmenter", result["segmenter_version"])
    assert segmenter.tags["export.onnx.sha256"] and segmenter.tags["cv.mean_cpm"] == f"{float(result['segmenter_cpm']):.4f}"
    version = client.get_model_version("pipeline-test-model", result["model_version"])
    assert version.tags["export.tensorrt"].startswith("skipped (") and version.tags["export.onnx.sha256"]
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

    # The work dir and the MLflow store (run and experiment descriptions, dataset inputs of the fold
    # runs, the model card, pictures' metadata) hold neither PHI nor an original UID.
    phi = pd.read_csv(clean_corpus / "phi.csv", keep_default_na=False)
    labels = pd.read_csv(clean_corpus / "labels.csv", dtype=str)
    needles = set(phi.value) | set(labels.SeriesInstanceUID) | set(labels.StudyInstanceUID) | set(labels.PatientID)
    assert scan_for_phi(tmp_path, needles) == []
    assert len(scan_for_phi(clean_corpus, needles)) > 5  # the scan is not vacuous

    again = preprocess(work=tmp_path / "work", config=config.preprocess)
    assert again["skipped"] and again["mlflow_run_id"] == result["preprocess_run_id"]

    # A rerun of the completed pipeline redoes nothing: no stage, no child run, no new version.
    start = time.perf_counter()
    second = pipeline(src=clean_corpus, config=config)
    second_seconds = time.perf_counter() - start
    assert second["skipped"] == "ingest,preprocess,train,export,segment"
    assert (second["model_version"], second["segmenter_version"]) == (result["model_version"],
                                                                       result["segmenter_version"])
    parent = client.get_run(second["mlflow_run_id"])
    assert client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'") == []
    assert len(client.search_model_versions("name = 'pipeline-test-model'")) == 1
    # The ratio itself is measured on the demo (README); on 20 tiny series the fixed cost of starting
    # flows dominates, so here only the order is asserted.
    assert second_seconds < first_seconds, (first_seconds, second_seconds)


def _config(name: str) -> PipelineConfig:
    return PipelineConfig(
        experiment=name,
        preprocess=PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), crop_xy=160, workers=1),
        train=TrainConfig(epochs=2, input_size=32, num_workers=0, model_name=f"{name}-model"),
        segment=TINY_SEGMENTER.model_copy(update={"model_name": f"{name}-segmenter"}),
        export=ExportConfig(parity_samples=16, calibration_samples=16, max_batch=8, preferred_batch_sizes=(8,),
                            int8_max_auc_drop=1.0))


def test_a_crash_mid_training_resumes_without_redoing_finished_work(
        corpus: Path, mlflow_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomops.layout import WorkLayout
    from dicomops.training import cv
    from dicomops.training import state as train_state

    config = _config("crash-test")
    real_run_fold = cv.run_fold

    def dies_on_fold_2(work, cfg, k, fold, uri, stop_after=None):  # type: ignore[no-untyped-def]
        if fold == 2:
            raise RuntimeError("killed at 3 a.m.")
        return real_run_fold(work, cfg, k, fold, uri, stop_after)

    monkeypatch.setattr(cv, "run_fold", dies_on_fold_2)
    with pytest.raises(RuntimeError, match="killed"):
        pipeline(src=corpus, config=config)
    work = tmp_path / "work"
    assert (work / ".stages/ingest.json").exists() and (work / ".stages/preprocess.json").exists()
    assert not (work / ".stages/train.json").exists()  # the crashed stage left no completion record
    assert not list(work.rglob("*.tmp"))  # and no half-written file

    monkeypatch.setattr(cv, "run_fold", real_run_fold)  # the machine is back
    state = train_state.load_state(WorkLayout(work))
    finished = {fold: state["folds"][fold]["run_id"] for fold in ("0", "1")}
    resumed = pipeline(src=corpus, config=config)
    assert resumed["skipped"] == "ingest,preprocess"
    client = mlflow.tracking.MlflowClient(mlflow_env)
    for fold, run_id in finished.items():  # the same runs, trained once: two epochs logged, not four
        assert train_state.load_state(WorkLayout(work))["folds"][fold]["run_id"] == run_id
        assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2]
    assert (work / ".stages/train.json").exists()
