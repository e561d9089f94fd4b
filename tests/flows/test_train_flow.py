"""Training for real, tiny: four folds through the Prefect flow, MLflow in tmp_path; resume; promote."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import mlflow
from dicomops import ingest
from dicomops.cli import app
from dicomops.config import IngestConfig, PreprocessConfig, SynthConfig, TrainConfig
from dicomops.feedback import privacy
from dicomops.layout import WorkLayout
from dicomops.preprocessing.stage import preprocess_corpus
from dicomops.synthetic import generate_corpus
from dicomops.training import cv, mlflow_runs
from dicomops.training import state as train_state
from dicomops.training.champion_pool import champion_on_pool
from flows.train import train
from tests.counts import assert_no_exact_counts

pytestmark = pytest.mark.usefixtures("prefect_harness")
KEY = b"train-test-key-0123456789abcdef0123"
PRE = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), crop_xy=160, workers=1)
TINY = TrainConfig(epochs=1, input_size=32, batch_size=16, num_workers=0, model_name="test-classifier")


@pytest.fixture(scope="module")
def train_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twenty patients ingested and preprocessed (2 mm, small crop), ready to train."""
    root = tmp_path_factory.mktemp("train")
    generate_corpus(root / "src", SynthConfig(patients=20, seed=17, fault_rate=0.0, matrix=128, slices=12, workers=1))
    work = root / "work"
    ingest.run(root / "src", work, IngestConfig(workers=1), KEY)
    preprocess_corpus(work, PRE)
    return work


def _fresh(train_work: Path, tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(train_work, work)
    return work


def test_train_flow_registers_a_reviewable_version(train_work: Path, mlflow_env: str, tmp_path: Path) -> None:
    work = _fresh(train_work, tmp_path)
    # The registry is new, so the gate judges the first version by min_auc alone. At 1.0 no one-epoch
    # model on 20 series reaches it: the version must wait for a reviewer, and so the manual
    # promotion below is what makes it champion.
    cfg = TINY.model_copy(update={"min_auc": 1.0})
    result = train(work=work, config=cfg, preprocess_config=PRE, experiment="train-test")
    client = mlflow.tracking.MlflowClient(mlflow_env)
    parent = client.get_run(str(result["mlflow_run_id"]))
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    for key in ("git_commit", "data.accepted_sha256", "split_sha256", "ingest.validation_success_share", "deid.profile",
                "version.torch", "version.monai"):
        assert tags.get(key), key
    assert parent.data.params["train.epochs"] == "1"
    assert "cv.mean_auc" in parent.data.metrics and "cv.auc.ge" in parent.data.metrics
    folds = client.search_runs([parent.info.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in folds) == ["fold-0", "fold-1", "fold-2", "fold-3"]
    assert all(r.info.status == "FINISHED" and "train_loss" in r.data.metrics for r in folds)
    assert "data_dvc_md5" not in tags  # the source corpus's DVC md5 is the ingest's; this is the accepted data's
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.note.content"] and tags["mlflow.note.content"].startswith("K-fold")
    split = WorkLayout(work).read_folds()
    for run in folds:  # each fold names the series it learned from and was scored on
        fold = int(run.data.tags["fold"])
        inputs = {i.tags[0].value: i.dataset for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
        assert set(inputs) == {"training", "validation"} and inputs["validation"].name.startswith(f"fold-{fold} ")
        assert f'"num_rows": {len(split.val(fold))}' in inputs["validation"].profile
        assert f'"num_rows": {len(split.train(fold))}' in inputs["training"].profile  # not the same rows twice
        assert inputs["training"].source_type == "local" and "/deid" in inputs["training"].source
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "cv")}
    assert {"cv/roc_by_vendor.png", "cv/roc_by_fold.png", "cv/confusion.png", "cv/samples.png",
            "cv/cv_summary.csv", "cv/folds.json", "cv/evidence_by_vendor.csv", "cv/per_fold_metrics.csv",
            "cv/oof_scores.parquet"} <= artifacts
    # A later promotion gate scores this version on its challenger's pool from them: series and score, no
    # vendor or label (dicomops.training.champion_pool).
    scores = pd.read_parquet(client.download_artifacts(parent.info.run_id, "cv/oof_scores.parquet", str(tmp_path)))
    assert list(scores.columns) == ["SeriesInstanceUID", "score"]
    assert sorted(scores.SeriesInstanceUID) == sorted(u for fold in range(4) for u in split.val(fold))
    assert "cv/fold_counts.csv" not in artifacts  # exact counts per fold and vendor stay in the work directory
    assert assert_no_exact_counts(client, parent.info.run_id, tmp_path / "scan") == 3 + 4  # cv/ and each fold

    version = client.get_model_version(TINY.model_name, str(result["version"]))
    card = version.description.replace("&nbsp;", "")
    assert card.startswith("## Decision: awaiting review — challenger"), card[:200]
    assert "cross-validation" in card and "| ge | " in card and "AUC pooled (95 % CI)" in card
    assert f"`{tags['data.accepted_sha256']}`" in card and "cv/folds.json" in card
    # The card's counts are the pool's release under differential privacy, paid once in the ledger.
    pool = privacy.pool_counts(work)
    assert pool.release is not None and pool.release.name == privacy.POOL_RELEASE
    assert f"| ge | {pool.cell('ge', 0)} | {pool.cell('ge', 1)} | " in card and pool.caption in card
    assert "TP / FP" not in card and "| series |" not in card
    ledger = privacy.ledger_for(work, None).entry(pool.release.dataset)
    assert [r["name"] for r in ledger.releases].count(privacy.POOL_RELEASE) == 1
    assert float(version.tags["cv.mean_auc"]) == pytest.approx(result["mean_auc"], abs=1e-4)
    assert result["mean_auc"] < 1.0 and result["promoted"] is False
    assert version.tags["promotion.decision"] == "awaiting-review"
    assert "no champion yet" in version.tags["promotion.reasons"]
    assert f"{result['mean_auc']:.4f} < 1.0000" in version.tags["promotion.reasons"]
    assert str(client.get_model_version_by_alias(TINY.model_name, "challenger").version) == str(version.version)
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(TINY.model_name, "champion")  # the gate held it back
    model = mlflow.pytorch.load_model(f"models:/{TINY.model_name}/{version.version}")
    assert model(torch.zeros(5, 3, 32, 32)).shape == (5, 2)  # the batch axis stayed dynamic

    ok = CliRunner().invoke(app, ["promote", str(version.version), "--model-name", TINY.model_name, "--reviewer", "dr-who"])
    assert ok.exit_code == 0, ok.output
    champion = client.get_model_version_by_alias(TINY.model_name, "champion")
    assert str(champion.version) == str(version.version) and champion.tags["promotion.reviewer"] == "dr-who"
    assert "challenger" not in client.get_registered_model(TINY.model_name).aliases  # one meaning per version
    assert champion.description.startswith("## Decision: approved by a reviewer — champion")
    assert CliRunner().invoke(app, ["promote", "999", "--model-name", TINY.model_name]).exit_code == 2

    counts = pd.read_csv(work / "train/fold_counts.csv")
    assert set(counts.fold) == {0, 1, 2, 3}


def test_interrupted_fold_resumes_into_the_same_run(train_work: Path, mlflow_env: str, tmp_path: Path) -> None:
    work = _fresh(train_work, tmp_path)
    cfg = TINY.model_copy(update={"epochs": 3, "patience": 5})
    layout = WorkLayout(work)
    split_hash = cv.prepare(layout, cfg).sha256
    key = train_state.run_key(layout, cfg, PRE, split_hash, "data")
    parent = mlflow_runs.open_parent_run(layout, key, mlflow_env, "resume-test", tmp_path / "art", {}, {}, None)
    with pytest.raises(InterruptedError):
        cv.run_fold(layout, cfg, 3, 0, mlflow_env, stop_after=1)  # killed after its first epoch
    client = mlflow.tracking.MlflowClient(mlflow_env)
    state = train_state.load_state(layout)
    fold_run = state["folds"]["0"]["run_id"]
    assert client.get_run(fold_run).info.status == "FAILED"
    checkpoint = torch.load(work / "train/fold-0/checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1

    assert mlflow_runs.open_parent_run(layout, key, mlflow_env, "resume-test", tmp_path / "art", {}, {}, None) \
        == parent
    cv.run_fold(layout, cfg, 3, 0, mlflow_env)
    run = client.get_run(fold_run)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["resumed_from_epoch"] == 1.0
    epochs = [m.step for m in client.get_metric_history(fold_run, "train_loss")]
    assert epochs == [1, 2, 3]  # continued at epoch 2, did not start over
    assert train_state.load_state(layout)["folds"]["0"]["done"]


def test_a_crash_after_registration_resumes_with_that_version_instead_of_training_again(
        train_work: Path, mlflow_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomops.monitoring import stage as monitoring

    work = _fresh(train_work, tmp_path)
    cfg = TINY.model_copy(update={"min_auc": 1.0, "model_name": "crash-classifier"})
    reference = monitoring.reference_for_version

    def crash(*args: object, **kwargs: object) -> str:
        raise RuntimeError("killed while storing the monitoring reference")

    monkeypatch.setattr(monitoring, "reference_for_version", crash)
    with pytest.raises(RuntimeError, match="monitoring reference"):
        train(work=work, config=cfg, preprocess_config=PRE, experiment="crash-test")
    layout = WorkLayout(work)
    state = train_state.load_state(layout)
    assert state["version"] == "1" and not state["complete"]  # registered, not complete: the gate never ran
    trained = {p: p.stat().st_mtime_ns for p in sorted((work / "train").glob("*/checkpoint.pt"))}
    assert len(trained) == 5  # four folds and the final model

    monkeypatch.setattr(monitoring, "reference_for_version", reference)
    result = train(work=work, config=cfg, preprocess_config=PRE, experiment="crash-test")
    assert (result["mlflow_run_id"], result["version"]) == (state["parent_run_id"], "1")
    assert {p: p.stat().st_mtime_ns for p in trained} == trained  # nothing trained again
    client = mlflow.tracking.MlflowClient(mlflow_env)
    versions = client.search_model_versions(f"name='{cfg.model_name}'")
    assert [str(v.version) for v in versions] == ["1"]  # no duplicate version, none superseded
    assert versions[0].tags["promotion.decision"] == "awaiting-review"
    assert client.get_run(str(result["mlflow_run_id"])).info.status == "FINISHED"
    assert train_state.load_state(layout)["complete"]  # the gate ran: a later training starts afresh


def test_leave_one_vendor_out_then_export_attaches_checked_files(train_work: Path, mlflow_env: str,
                                                                  tmp_path: Path) -> None:
    from dicomops.config import ExportConfig
    from flows.export import export

    work = _fresh(train_work, tmp_path)
    cfg = TINY.model_copy(update={"leave_one_vendor_out": True, "model_name": "lovo-classifier"})
    result = train(work=work, config=cfg, preprocess_config=PRE, experiment="lovo-test")
    client = mlflow.tracking.MlflowClient(mlflow_env)
    parent = client.get_run(str(result["mlflow_run_id"]))
    nested = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    vendors = set(pd.read_parquet(work / "preprocessed/index.parquet").query("label >= 0").vendor)
    assert {r.info.run_name for r in nested} >= {f"lovo-{v}" for v in vendors}
    lovo = pd.read_csv(work / "train/lovo.csv")
    assert set(lovo.held_out_vendor) == vendors and (lovo.n > 0).all()
    version = client.get_model_version(cfg.model_name, str(result["version"]))
    assert "## Unseen scanners" in version.description

    export_cfg = ExportConfig(parity_samples=32, calibration_samples=32, max_batch=8, preferred_batch_sizes=(4, 8),
                              int8_max_auc_drop=1.0)
    from dicomops.training import data

    assert data._SLABS  # training left its slabs in the process's cache ...
    exported = export(work=work, config=export_cfg, model_name=cfg.model_name)  # the version just registered
    assert not data._SLABS  # ... and the export, their last reader, gave them back
    exported_version = client.get_model_version(cfg.model_name, str(result["version"]))
    tags = exported_version.tags
    assert "## Export" in exported_version.description and "## Unseen scanners" in exported_version.description
    assert float(tags["export.onnx.parity_max_abs_diff"]) <= 1e-4
    folder = Path(str(exported["folder"]))
    # A one-epoch model on 19 validation slabs: how much INT8 loses is noise, not a quality figure
    # (the check itself is exercised on a ranked set in tests/unit/test_export.py). What is exact:
    # the tags are the AUCs of the two exported files on the check fold's validation slabs, and the
    # drop is their difference.
    from sklearn.metrics import roc_auc_score

    from dicomops.export import onnx_export, quantize, tensorrt_engine
    from dicomops.export.stage import check_data

    _, val = check_data(WorkLayout(work), onnx_export.read_contract(folder / "model.onnx"), export_cfg.check_fold)
    x, y = val.x.float().numpy(), val.y.numpy()
    auc_fp32, auc_int8 = (roc_auc_score(y, onnx_export.run_onnx(onnx_export.session(folder / name), x)[:, 1])
                          for name in ("model.onnx", "model.int8.onnx"))
    assert float(tags["export.int8.validation_samples"]) == len(y)
    assert float(tags["export.int8.auc_fp32"]) == pytest.approx(auc_fp32, rel=1e-5)
    assert float(tags["export.int8.auc_int8"]) == pytest.approx(auc_int8, rel=1e-5)
    assert float(tags["export.int8.auc_drop"]) == pytest.approx(auc_fp32 - auc_int8, abs=1e-5)
    # The series check: both files' series scores (the version's rule over every slab) of the check
    # fold's validation series, as serving computes them; its verdict decides whether INT8 is served.
    from dicomops.training.data import all_slabs, load_volume
    from dicomops.training.scoring import SeriesRule, series_score

    layout, rule = WorkLayout(work), SeriesRule.of(cfg)
    uids = layout.read_folds().val(export_cfg.check_fold)
    paths = layout.preprocessed.read_index().set_index("SeriesInstanceUID").path
    labels = layout.labelled_series().set_index("SeriesInstanceUID").label
    slabs = [all_slabs(load_volume(layout.preprocessed.volume(paths[u])), 3, cfg.input_size).numpy() for u in uids]
    series_scores = [[series_score(onnx_export.run_onnx(onnx_export.session(folder / name), x)[:, 1], rule)
                      for x in slabs] for name in ("model.onnx", "model.int8.onnx")]
    assert float(tags["export.int8.series"]) == len(uids)
    for which, scores_ in zip(("fp32", "int8"), series_scores, strict=True):
        assert float(tags[f"export.int8.series_auc_{which}"]) == pytest.approx(
            roc_auc_score(labels.loc[uids], scores_), abs=1e-5)
    assert float(tags["export.int8.series_max_abs_diff"]) == pytest.approx(
        max(abs(a - b) for a, b in zip(*series_scores, strict=True)), abs=1e-5)
    assert tags["export.int8.series_check"].startswith("passed: series AUC ")  # int8_max_auc_drop 1.0
    # OpenVINO serves the same file with its own kernels, so it has its own series check and verdict
    from dicomops.export import openvino_engine

    runner = openvino_engine.OpenVinoRunner(folder / "model.int8.onnx", 2, export_cfg.max_batch)
    try:
        ov_scores = [series_score(openvino_engine.run_batches(runner, x, export_cfg.max_batch)[:, 1], rule) for x in slabs]
    finally:
        runner.close()
    assert float(tags["export.ov_int8.series_auc_int8"]) == pytest.approx(roc_auc_score(labels.loc[uids], ov_scores),
                                                                          abs=1e-5)
    assert float(tags["export.ov_int8.series_max_abs_diff"]) == pytest.approx(
        max(abs(a - b) for a, b in zip(series_scores[0], ov_scores, strict=True)), abs=1e-5)
    assert tags["export.ov_int8.series_check"].startswith("passed: series AUC ")
    # export.int8_float_head "auto": the head was timed, and the tag says what the served file holds
    import onnx

    assert float(tags["export.int8.float_head_speedup"]) > 0 and float(tags["export.ort_int8.speedup_b8"]) > 0
    served = {p.key: p.value for p in onnx.load(folder / "model.int8.onnx").metadata_props}
    kept = tags["export.int8.float_convolutions"]
    assert served.get("dicomops.float_convolutions", "none") == (kept if kept == "none" else ", ".join(sorted(kept.split(", "))))
    assert (kept == "none") == (float(tags["export.int8.float_head_speedup"]) < quantize.FLOAT_HEAD_GAIN)
    reason = tensorrt_engine.availability()
    assert tags["export.tensorrt"].startswith("built") if reason is None else tags["export.tensorrt"] == f"skipped ({reason})"
    assert float(tags["export.ort_fp32.latency_ms_b1"]) > 0
    # OpenVINO compiled both files, every arithmetic layer of the INT8 one in integers but those the
    # float head keeps in float, within the INT8 check
    assert tags["export.openvino"].startswith("built fp32, int8 (OpenVINO "), tags["export.openvino"]
    assert float(tags["export.ov_fp32.parity_max_abs_diff"]) <= export_cfg.parity_tolerance
    in_float = 0 if kept == "none" else len(kept.split(", "))
    assert float(tags["export.ov_int8.integer_layers"]) == float(tags["export.ov_int8.arithmetic_layers"]) - in_float > 0
    assert float(tags["export.ov_int8.auc_drop"]) <= export_cfg.int8_max_auc_drop
    assert float(tags["export.ov_int8.speedup_vs_ort_fp32_b8"]) > 0
    files = exported["files"]
    assert isinstance(files, dict)
    assert {"model.onnx", "model.int8.onnx", f"model_repository/{cfg.model_name}/config.pbtxt",
            f"model_repository/{cfg.model_name}/{version.version}/model.onnx"} <= set(files)
    assert tags["export.onnx.sha256"] == files["model.onnx"]
    import hashlib
    assert hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest() == files["model.onnx"]
    listed = {a.path for a in client.list_artifacts(version.run_id, "export")}
    assert {"export/model.onnx", "export/model.int8.onnx", "export/manifest.json", "export/model_repository"} <= listed

    # `dicomops export --int8 qat` with the held-out comparison: each fold's FP32, PTQ and QAT graphs,
    # and the float fine-tune that is QAT's control, score exactly that fold's validation series, and
    # FP32 gives the training's own out-of-fold scores again (the fold's model, not the final one,
    # which saw those series).
    held = export_cfg.model_copy(update={"int8": "qat", "int8_held_out": True, "int8_float_head": "always"})
    folder = Path(str(export(work=work, config=held, model_name=cfg.model_name)["folder"]))
    scores = pd.read_csv(folder / "int8_held_out_scores.csv")
    folds = WorkLayout(work).read_folds()
    engines = {"fp32", "int8-ptq", "int8-qat", "fp32-finetuned"}
    assert set(scores.engine) == engines and set(scores.fold) == set(range(folds.n_splits))
    for fold, part in scores.groupby("fold"):
        for engine, rows in part.groupby("engine"):
            assert sorted(rows.SeriesInstanceUID) == sorted(folds.val(fold)), (fold, engine)
        oof = pd.read_parquet(work / f"train/fold-{fold}/predictions.parquet").set_index("SeriesInstanceUID").score
        fp32 = part[part.engine == "fp32"].set_index("SeriesInstanceUID").score.loc[oof.index]
        assert fp32.nunique() > 1  # a model that ranks, so the fold's model is told apart from the final one
        np.testing.assert_allclose(fp32.to_numpy(), oof.to_numpy(), atol=1e-4)
    table = pd.read_csv(folder / "int8_held_out.csv").set_index("engine")
    tags = client.get_model_version(cfg.model_name, str(result["version"])).tags
    for engine in engines:
        assert float(tags[f"export.held_out.{engine}.mean_fold_auc"]) == pytest.approx(
            table.loc[engine, "mean_fold_auc"], abs=1e-5)
    assert not (folder / "held_out").exists()  # the folds' own files are not the version's
    listed = {a.path for a in client.list_artifacts(version.run_id, "export")}
    assert {"export/int8_held_out.csv", "export/int8_held_out.png"} <= listed  # the ROC per engine, for the UI


def test_student_distils_from_a_3d_teacher_fold_by_fold(train_work: Path, mlflow_env: str, tmp_path: Path) -> None:
    import yaml

    from dicomops.tracking.registry import load_weights
    from dicomops.training import distill
    from dicomops.training.cv import score_series
    from dicomops.training.data import build_slab_set
    from dicomops.training.model import model_from_config
    from dicomops.training.scoring import SeriesRule

    work = _fresh(train_work, tmp_path)
    layout = WorkLayout(work)
    name = "distil-classifier"
    # The teacher: a 3-D ResNet over 5-slice slabs, through the flow like any classifier.
    teacher_pre = PRE.model_copy(update={"slab_slices": 5})
    teacher_cfg = TINY.model_copy(update={"architecture": "resnet3d-slim", "model_name": name})
    teacher = train(work=work, config=teacher_cfg, preprocess_config=teacher_pre, experiment="distil-test")
    tv = str(teacher["version"])
    client = mlflow.tracking.MlflowClient(mlflow_env)
    assert client.get_model_version(name, tv).tags["architecture"] == "resnet3d-slim"
    # Each fold run holds the model that scored that fold: rebuilt from its artifacts, it gives the
    # fold's out-of-fold predictions again.
    fold0 = distill.fold_run(mlflow_env, str(teacher["mlflow_run_id"]), 0)
    model, raw = load_weights(mlflow_env, fold0, model_from_config)
    assert raw["in_channels"] == 5 and raw["architecture"] == "resnet3d-slim"
    oof = pd.read_parquet(work / "train/fold-0/predictions.parquet")
    series = layout.labelled_series().set_index("SeriesInstanceUID").loc[list(oof.SeriesInstanceUID)].reset_index()
    again = score_series(model, layout, series, 5, TINY.input_size, SeriesRule.of(TINY))
    assert np.allclose(again.score.to_numpy(), oof.score.to_numpy(), atol=1e-5)

    # The student, from the command line as the README says.
    config = tmp_path / "student.yaml"
    config.write_text(yaml.safe_dump({"train": TINY.model_copy(update={"model_name": name}).model_dump(mode="json"),
                                      "preprocess": PRE.model_dump(mode="json")}))
    done = CliRunner().invoke(app, ["train", "--work", str(work), "--config", str(config), "--architecture", "student",
                                    "--distill-from", tv])
    assert done.exit_code == 0, done.output
    student = client.get_model_version(name, str(int(tv) + 1))
    assert student.tags["architecture"] == "mobilenet-v3-small" and student.tags["distilled_from"] == f"{name}/{tv}"
    assert f"version {tv} of {name} (alpha 0.7, temperature 3.0)" in student.description
    student_run = client.get_run(student.run_id)
    assert student_run.data.params["train.distill_from"] == tv

    # Fold by fold: the soft targets of fold i come from the teacher's fold-i model, the final
    # student's from its final model; all four differ on the same slabs.
    slabs = build_slab_set(layout, layout.read_folds().train(0), 3, TINY.input_size)
    targets = [distill.teacher_targets(layout, mlflow_env, name, tv, student.run_id, slabs, fold)
               for fold in (0, 1, None)]
    assert targets[0].shape == (len(slabs.y), 2)
    assert not torch.allclose(targets[0], targets[1]) and not torch.allclose(targets[0], targets[2])
    own = build_slab_set(layout, layout.read_folds().train(0), 5, TINY.input_size)
    assert torch.allclose(targets[0], distill.logits(model, own.x), atol=1e-5)
    # Its export's quantisation-aware fine-tune learns from the same teacher as its training did
    # (dicomops.export.qat); the teacher's own version, trained on labels, has none.
    from dicomops.config import TrainConfig
    from dicomops.export import qat

    _, student_raw = load_weights(mlflow_env, distill.fold_run(mlflow_env, student.run_id, 0), model_from_config)
    taught = qat.teacher_of(layout, mlflow_env, student.run_id, TrainConfig.from_logged(student_raw), slabs, 0)
    assert taught is not None and (taught.alpha, taught.temperature) == (0.7, 3.0)
    assert torch.equal(taught.logits, targets[0])
    assert qat.teacher_of(layout, mlflow_env, str(teacher["mlflow_run_id"]), TrainConfig.from_logged(raw), slabs,
                          0) is None

    # A teacher from another split or corpus, or one that does not exist, is refused with the reason.
    client.set_tag(str(teacher["mlflow_run_id"]), "split_sha256", "another-split")
    with pytest.raises(ValueError, match=r"split_sha256 'another-split'.*retrain the teacher"):
        distill.teacher_run(mlflow_env, name, tv, student.run_id)
    # A student on volumes preprocessed otherwise (the slab depth alone may differ, as here: 5 and 3).
    client.set_tag(str(teacher["mlflow_run_id"]), "split_sha256", student_run.data.tags["split_sha256"])
    other = client.create_run(student_run.info.experiment_id, tags=student_run.data.tags)
    for key, value in student_run.data.params.items():
        client.log_param(other.info.run_id, key, "bone" if key == "preprocess.window" else value)
    assert distill.teacher_run(mlflow_env, name, tv, student.run_id) == teacher["mlflow_run_id"]
    with pytest.raises(ValueError, match=r"other settings \(preprocess.window lung -> bone\).*retrain the teacher"):
        distill.teacher_run(mlflow_env, name, tv, other.info.run_id)
    refused = CliRunner().invoke(app, ["train", "--work", str(work), "--config", str(config), "--architecture",
                                       "student", "--distill-from", "999"])
    assert refused.exit_code == 2 and "no version 999 of distil-classifier" in refused.output


def test_a_slab_sets_nodule_masks_are_its_centre_slices_and_a_training_runs_on_them(train_work: Path,
                                                                                     tmp_path: Path) -> None:
    from dicomops.training import data
    from dicomops.training.loop import fit

    layout = WorkLayout(_fresh(train_work, tmp_path))
    ids = sorted(layout.labelled_series().SeriesInstanceUID)
    data.forget_slabs()
    slabs = data.build_slab_set(layout, ids, 3, 32, masks=True)
    assert slabs.masks is not None and slabs.masks.shape == (len(slabs.y), 32, 32)
    assert torch.equal(slabs.x, data.build_slab_set(layout, ids, 3, 32).x)  # the slabs as without masks
    # Every positive slab shows its nodule; each mask is that of the cached volume's slice.
    assert all(bool(slabs.masks[i].any()) for i in np.flatnonzero(slabs.y.numpy() == 1))
    paths = layout.labelled_series().set_index("SeriesInstanceUID").path
    uid = slabs.series[int(np.flatnonzero(slabs.y.numpy() == 1)[0])]
    rows = np.flatnonzero(np.asarray(slabs.series) == uid)
    with np.load(layout.preprocessed.volume(paths[uid])) as npz:
        assert torch.equal(slabs.masks[rows], data.masks_at(npz["mask"], slabs.z[rows], 32))
    result = fit(slabs, None, TINY.model_copy(update={"aux_mask_weight": 1.0}), tmp_path / "c.pt", seed=0)
    assert np.isfinite(result.history[0]["train_loss"])


def test_slab_sets_are_built_once_per_process_and_never_stale(train_work: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomops.training import data

    layout = WorkLayout(_fresh(train_work, tmp_path))
    everyone = sorted(layout.labelled_series().SeriesInstanceUID)
    some = everyone[: len(everyone) // 2]
    read: list[str] = []
    real = data.load_volume
    monkeypatch.setattr(data, "load_volume", lambda path: read.append(Path(path).name) or real(path))
    data.forget_slabs()
    first = data.build_slab_set(layout, some, 3, 32)
    assert len(read) == len(set(first.series))
    read.clear()
    again = data.build_slab_set(layout, everyone, 3, 32)
    assert len(read) == len(everyone) - len(set(first.series))  # only the series not read before
    picked = np.isin(again.series, list(set(first.series)))
    assert torch.equal(again.x[picked], first.x) and torch.equal(again.y[picked], first.y)
    data.forget_slabs()
    read.clear()
    assert torch.equal(data.build_slab_set(layout, everyone, 3, 32).x, again.x)  # the cache changes nothing
    assert len(read) == len(everyone)

    # A volume rewritten in place is read again, with what it now holds.
    read.clear()
    index = layout.preprocessed.read_index().set_index("SeriesInstanceUID")
    path = layout.preprocessed.volume(index.loc[everyone[0], "path"])
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["image"] = np.zeros_like(arrays["image"])
    np.savez_compressed(path, **arrays)
    changed = data.build_slab_set(layout, everyone, 3, 32)
    assert read == [path.name]
    mine = np.asarray(changed.series) == everyone[0]
    assert not changed.x[mine].any() and torch.equal(changed.x[~mine], again.x[~mine])

    # Another work directory's slabs replace this one's: a process holds one corpus at a time.
    other = WorkLayout(_fresh(train_work, tmp_path / "other"))
    data.build_slab_set(other, everyone[:1], 3, 32)
    assert {key[0] for key in data._SLABS} == {str(other.preprocessed.volume(index.loc[everyone[0], "path"]))}
    data.forget_slabs()


def test_a_version_trained_again_on_the_champions_pool_meets_its_own_cv_figures(train_work: Path, mlflow_env: str,
                                                                                tmp_path: Path) -> None:
    # The gate scores the champion on the challenger's pool and folds (dicomops.training.champion_pool).
    # On the very pool and split it was cross-validated on, that is its own CV: the same figure as its
    # tags, from the out-of-fold scores its run keeps, with no series for a fold model to score again.
    work = _fresh(train_work, tmp_path)
    cfg = TINY.model_copy(update={"model_name": "same-pool", "min_auc": 0.0})
    first = train(work=work, config=cfg, preprocess_config=PRE, experiment="same-pool")
    assert first["promoted"]
    second = train(work=work, config=cfg.model_copy(update={"learning_rate": 1e-3}), preprocess_config=PRE,
                   experiment="same-pool")
    client = mlflow.tracking.MlflowClient(mlflow_env)
    reasons = client.get_model_version("same-pool", str(second["version"])).tags["promotion.reasons"]
    assert reasons.startswith(f"compared on this version's pool, labels and folds: champion v{first['version']} by the "
                              "models of its cross-validation, each series scored by one that never trained on its "
                              "patient; "), reasons
    assert f"champion {first['mean_auc']:.4f}" in reasons and f"AUC {second['mean_auc']:.4f}" in reasons
    compared = champion_on_pool(work, mlflow_env, "same-pool", str(first["version"]))
    assert (compared.series, compared.rescored) == (20, 0)


def test_wall_positives_are_the_slices_of_the_nodules_the_generator_put_on_the_wall_taken_n_times(
        train_work: Path, tmp_path: Path) -> None:
    """``preprocess.wall_positive_repeat``: the positive slices through a nodule on the chest wall are
    marked in the slab table and taken that many times by a training set, once by a validation set.
    The wall is read off the image: every nodule the generator attached to the pleura is found (at
    these 2 mm voxels the rule's reach is 4 mm, so a nodule near the mediastinum may be found too;
    at the default 1 mm it found the demo's 28 pleural nodules and none of its 125 others)."""
    import json

    from dicomops.segmentation.data import wall_nodules
    from dicomops.training import data

    work = _fresh(train_work, tmp_path)
    layout = WorkLayout(work)
    before = layout.preprocessed.read_slabs()
    preprocess_corpus(work, PRE.model_copy(update={"wall_positive_repeat": 3}))
    slabs = layout.preprocessed.read_slabs()
    assert slabs.drop(columns="repeat").equals(before.drop(columns="repeat"))  # the same draw, marked
    assert set(before.repeat) == {1} and set(slabs.repeat) == {1, 3}
    labels = pd.read_csv(work / "deid" / "labels.csv").set_index("SeriesInstanceUID")
    index = layout.preprocessed.read_index().set_index("SeriesInstanceUID")
    pleural_seen = 0
    for uid, rows in slabs.groupby("SeriesInstanceUID"):
        with np.load(layout.preprocessed.volume(index.path[uid])) as npz:
            image, mask = npz["image"], npz["mask"]
        records = json.loads(labels.nodules[uid]) if isinstance(labels.nodules[uid], str) else []
        pleural = [i + 1 for i, n in enumerate(records) if n["attachment"] == "pleural" and (mask == i + 1).any()]
        wall = wall_nodules(image, mask)
        assert set(pleural) <= set(wall)
        pleural_seen += len(pleural)
        on_wall = np.isin(mask, wall).reshape(-1, mask.shape[-1]).sum(0) >= PRE.min_positive_voxels
        expected = np.where((rows.slice_label.to_numpy() == 1) & on_wall[rows.z.to_numpy()], 3, 1)
        assert rows.repeat.tolist() == expected.tolist(), uid
    assert pleural_seen >= 2
    data.forget_slabs()
    ids = sorted(set(slabs.SeriesInstanceUID))
    once, taken = data.build_slab_set(layout, ids, 3, 32), data.build_slab_set(layout, ids, 3, 32, repeats=True)
    assert len(once.y) == len(slabs) and len(taken.y) == int(slabs.repeat.sum())
    pairs = list(zip(taken.series, taken.z.tolist(), strict=True))
    for (uid, z), n in slabs.groupby(["SeriesInstanceUID", "z"]).repeat.first().items():
        assert pairs.count((uid, z)) == n
    twice = np.flatnonzero([(s, z) == pairs[i] for i, (s, z) in enumerate(pairs[1:])])  # a copy beside its slab
    assert len(twice) and all(torch.equal(taken.x[i], taken.x[i + 1]) for i in twice)
    data.forget_slabs()
