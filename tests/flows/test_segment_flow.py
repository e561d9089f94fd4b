"""The segmenter for real, tiny: four folds through the Prefect flow, MLflow in tmp_path, registry,
gate on CPM, resumption, and a leak scan of what it wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mlflow
from dicomops import ingest
from dicomops.config import IngestConfig, PreprocessConfig, SegmentConfig, SynthConfig, TrainConfig
from dicomops.deid.scan import scan_for_phi
from dicomops.layout import WorkLayout
from dicomops.preprocessing.stage import preprocess_corpus
from dicomops.segmentation import cv
from dicomops.serving.segmenter import load_segmenter, localise, optional_segmenter
from dicomops.synthetic import generate_corpus
from flows.segment import segment
from tests.conftest import PREFECT_HOME
from tests.counts import assert_no_exact_counts
from tests.flows.test_ingest_flow import _prefect_database
from tests.flows.test_progress import flow_log_messages

pytestmark = pytest.mark.usefixtures("prefect_harness")
KEY = b"segment-test-key-0123456789abcdef01"
PRE = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), crop_xy=96, workers=1)
TRAIN = TrainConfig(epochs=1, input_size=32, num_workers=0)
TINY_SEGMENTER = SegmentConfig(channels=(4, 8), strides=(2,), patch=(16, 16, 16), roi=(48, 48, 16), batch_size=4,
                               patches_per_epoch=8, epochs=1, model_name="test-segmenter")


@pytest.fixture(scope="module")
def seg_work(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Twenty patients with every nodule kind, ingested and preprocessed (2 mm, small crop)."""
    root = tmp_path_factory.mktemp("segment")
    src = root / "src"
    generate_corpus(src, SynthConfig(patients=20, seed=29, fault_rate=0.0, matrix=128, slices=16, workers=1))
    work = root / "work"
    ingest.run(src, work, IngestConfig(workers=1), KEY)
    preprocess_corpus(work, PRE)
    return src, work


def test_segment_flow_registers_a_gated_version_with_froc_dice_and_kappa(
        seg_work: tuple[Path, Path], mlflow_env: str, tmp_path: Path) -> None:
    src, prepared = seg_work
    work = tmp_path / "work"
    shutil.copytree(prepared, work)
    result = segment(work=work, config=TINY_SEGMENTER, preprocess_config=PRE, train_config=TRAIN,
                     experiment="segment-test")
    client = mlflow.tracking.MlflowClient(mlflow_env)
    parent = client.get_run(str(result["mlflow_run_id"]))
    assert parent.info.status == "FINISHED" and parent.info.run_name == "segment"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == [f"segment-fold-{i}" for i in range(4)]
    assert all(r.info.status == "FINISHED" and "cpm" in r.data.metrics for r in children)
    metrics = parent.data.metrics
    assert version_has_onnx(client, str(result["version"]))
    for key in ("cpm", "dice_ge6_mean", "dice_ge6_native_mean", "kappa_series", "sens_at_1",
                "final.samples_per_second"):
        assert key in metrics, key
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "cv")}
    assert {"cv/froc_by_vendor.png", "cv/froc_by_kind.png", "cv/contours.png", "cv/metrics_by_group.csv",
            "cv/summary.json"} <= artifacts
    # One row per nodule or series would let anyone count: those tables stay in the work directory.
    assert not {"cv/nodules.csv", "cv/series.csv"} & artifacts
    assert assert_no_exact_counts(client, parent.info.run_id, tmp_path / "scan") >= 1

    # Out of fold: every labelled series judged once, every surviving nodule in the table.
    layout = WorkLayout(work)
    folds = layout.read_folds()
    series = pd.read_csv(layout.segment.series)
    assert sorted(series.series) == sorted(uid for i in range(4) for uid in folds.val(i))
    nodules = pd.read_csv(layout.segment.nodules)
    labels = pd.read_csv(src / "labels.csv")
    assert 0 < len(nodules) <= labels.nodule_count.sum()
    assert set(nodules.kind) <= {"solid", "part-solid", "ground-glass"}
    table = pd.read_csv(layout.segment.by_group)
    assert set(table[table.group == "vendor"].value) == set(labels.vendor)
    # Each vendor's series kappa comes with its bootstrap interval (NaN where kappa is undefined).
    vendors = table[table.group == "vendor"].dropna(subset=["kappa_series_low", "kappa_series_high"])
    assert ((vendors.kappa_series_low >= -1) & (vendors.kappa_series_low <= vendors.kappa_series_high)
            & (vendors.kappa_series_high <= 1)).all()
    assert set(json.loads(layout.segment.summary.read_text())["vendor_kappa_interval"]) == set(labels.vendor)
    # The actionable call: every judged series carries its label and score, and the CV reports
    # their AUC per fold and vendor as the classifier does (a tiny model may rank at chance).
    evals = [e for i in range(4) for e in cv.load_evals(layout.segment.fold(i) / "evals.json")]
    index = layout.labelled_series().set_index("SeriesInstanceUID")
    assert all(e.actionable_ref == bool(index.loc[e.series, "label"]) for e in evals)
    assert all(0.0 <= e.actionable_score <= 1.0 for e in evals)
    assert 0.0 <= result["actionable_auc"] <= 1.0
    assert "cv.actionable_auc" in metrics and table.auc_actionable.notna().any()
    assert "AUC (actionable)" in client.get_model_version("test-segmenter", str(result["version"])).description

    version = client.get_model_version("test-segmenter", str(result["version"]))
    assert version.tags["cv.mean_cpm"] == f"{result['cpm']:.4f}"
    # The gate compares the figures the run logged to full precision, not the tags' four decimals.
    assert metrics["cv.mean_cpm"] == result["cpm"] and metrics["cv.dice_ge6"] == result["dice_ge6"]
    assert {t for t in version.tags if t.startswith("cv.cpm.")}
    assert version.tags["promotion.decision"] in ("auto-promoted", "awaiting-review")
    assert "CPM" in version.tags["promotion.reasons"]
    assert "FROC" not in version.description or "CPM" in version.description
    assert "Dice" in version.description and "kappa" in version.description
    # The Dice on each series' own slices too, where the annotation was drawn and the SEG goes back.
    assert "on its slices" in version.description and 0.0 <= result["dice_ge6_native"] <= 1.0
    assert version.tags["cv.dice_ge6_native"] == f"{result['dice_ge6_native']:.4f}"
    assert nodules.dice_native.notna().all()
    assert "Counts of the training pool released under differential privacy" in version.description

    # Serving loads that version from the registry (its export, config and preprocessing) and reports
    # on a preprocessed volume; a damaged served copy is fetched anew, a tampered registered export
    # is refused; an unpromoted name is "no segmenter".
    models = tmp_path / "models"
    served = load_segmenter(mlflow_env, "test-segmenter", version=str(result["version"]), models_dir=models)
    assert served.cfg == TINY_SEGMENTER and served.preprocess == PRE
    with np.load(next(layout.preprocessed.volumes.glob("*.npz"))) as npz:
        image, affine = npz["image"].astype(np.float32), npz["affine"]
    report = localise(served, image, affine)
    assert report.mask.shape == image.shape and 0.0 <= report.score <= 1.0
    assert all(n.score >= TINY_SEGMENTER.finding_threshold for n in report.nodules)
    onnx_file = models / f"test-segmenter-v{result['version']}" / "export" / "segmenter.onnx"
    good = onnx_file.read_bytes()
    onnx_file.write_bytes(good + b"\0")
    load_segmenter(mlflow_env, "test-segmenter", version=str(result["version"]), models_dir=models)
    assert onnx_file.read_bytes() == good
    from urllib.parse import urlparse

    stored = Path(urlparse(client.get_run(version.run_id).info.artifact_uri).path) / "export" / "segmenter.onnx"
    stored.write_bytes(good + b"\0")
    shutil.rmtree(models)
    with pytest.raises(ValueError, match="does not match its registered sha256"):
        load_segmenter(mlflow_env, "test-segmenter", version=str(result["version"]), models_dir=models)
    stored.write_bytes(good)
    assert optional_segmenter(mlflow_env, "no-such-segmenter") is None

    # A rerun with nothing changed is skipped; the segmenter's files leak nothing.
    again = segment(work=work, config=TINY_SEGMENTER, preprocess_config=PRE, train_config=TRAIN,
                    experiment="segment-test")
    assert again["skipped"] and again["version"] == result["version"]
    # Only the gate's settings changed: nothing trains again, the gate decides anew on that version
    # (no champion yet, every floor off: promoted), and the next run with them is skipped outright.
    runs_before = len(client.search_runs([parent.info.experiment_id]))
    loose = TINY_SEGMENTER.model_copy(update={"min_cpm": 0.0, "min_dice": 0.0, "min_series_kappa": -1.0})
    for _ in range(2):
        regated = segment(work=work, config=loose, preprocess_config=PRE, train_config=TRAIN,
                          experiment="segment-test")
        assert regated["skipped"] and (regated["version"], regated["mlflow_run_id"]) == (result["version"],
                                                                                         result["mlflow_run_id"])
        assert (regated["decision"], regated["promoted"]) == ("auto-promoted", True)
    assert len(client.search_runs([parent.info.experiment_id])) == runs_before
    assert client.get_model_version("test-segmenter", str(result["version"])).tags["promotion.decision"] == \
        "auto-promoted"
    # Another model on the champion's own pool and split: the gate judges the champion again by its
    # fold models, each on the series it held out, and finds its own CV figure exactly
    # (dicomops.segmentation.champion_pool; new series are the monitor flow's retrain test's).
    assert "cv/folds.json" in {a.path for a in client.list_artifacts(parent.info.run_id, "cv")}
    second = segment(work=work, config=loose.model_copy(update={"learning_rate": 1e-3}), preprocess_config=PRE,
                     train_config=TRAIN, experiment="segment-test")
    assert second["version"] != result["version"]
    reasons = client.get_model_version("test-segmenter", str(second["version"])).tags["promotion.reasons"]
    assert reasons.startswith(f"compared on this version's pool, labels and folds: champion v{result['version']} "
                              "by the models of its cross-validation, each series scored by one that never trained "
                              "on its patient; "), reasons
    assert f"champion {parent.data.metrics['cv.mean_cpm']:.4f}" in reasons, reasons
    phi = pd.read_csv(src / "phi.csv", keep_default_na=False)
    needles = set(phi.value) | set(labels.SeriesInstanceUID.astype(str)) | set(labels.StudyInstanceUID.astype(str))
    for place in (layout.segment.root, tmp_path / "mlflow", PREFECT_HOME, _prefect_database()):
        assert scan_for_phi(place, needles) == [], place
    assert len(scan_for_phi(src / "case-00001", needles)) > 5  # the scan is not vacuous
    # Training showed its progress in the flow run's log, which the scan above covered.
    messages = flow_log_messages()
    for line in ("segmenter fold 3: epoch 1/1, loss ", "final segmenter: epoch 1/1, loss "):
        assert any(m.startswith(line) for m in messages), line


def test_an_interrupted_fold_resumes_into_the_same_run(seg_work: tuple[Path, Path], mlflow_env: str,
                                                       tmp_path: Path) -> None:
    _, prepared = seg_work
    work = tmp_path / "work"
    shutil.copytree(prepared, work)
    layout = WorkLayout(work)
    from dicomops.training.splits import load_or_create_folds

    folds = load_or_create_folds(layout, layout.labelled_series(), 4, 0)
    cfg = TINY_SEGMENTER.model_copy(update={"epochs": 2})
    cv.open_run(layout, "k", mlflow_env, "segment-resume", None, {}, {}, None)
    with pytest.raises(InterruptedError):
        cv.run_fold(layout, cfg, 0, mlflow_env, pre=PreprocessConfig(), stop_after=1)
    run_id = cv._fold_entry(layout, 0)["run_id"]
    assert (layout.segment.fold(0) / "checkpoint.pt").exists() and not cv._fold_entry(layout, 0)["done"]
    cv.run_fold(layout, cfg, 0, mlflow_env, pre=PreprocessConfig())
    assert cv._fold_entry(layout, 0) == {"run_id": run_id, "done": True}
    client = mlflow.tracking.MlflowClient(mlflow_env)
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2]  # epoch 1 once, then epoch 2 after the resume
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(cv.load_evals(layout.segment.fold(0) / "evals.json")) == len(folds.val(0))


def version_has_onnx(client: mlflow.tracking.MlflowClient, version: str) -> bool:
    return version_has_onnx_of(client, "test-segmenter", version)


def version_has_onnx_of(client: mlflow.tracking.MlflowClient, name: str, version: str) -> bool:
    """The version's run holds the exported ONNX under its recorded sha256, with parity within tolerance."""
    import hashlib

    mv = client.get_model_version(name, version)
    local = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="export/segmenter.onnx",
                                                     tracking_uri=client._tracking_client.tracking_uri))
    return (hashlib.sha256(local.read_bytes()).hexdigest() == mv.tags["export.onnx.sha256"]
            and float(mv.tags["export.parity_max_abs_diff"]) <= cv.PARITY_TOLERANCE)


def test_a_retried_registration_and_a_failed_export_or_gate_resume_with_the_version_it_registered(
        seg_work: tuple[Path, Path], mlflow_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomops.errors import ExportCheckError

    _, prepared = seg_work
    work = tmp_path / "work"
    shutil.copytree(prepared, work)
    real_export, real_card = cv.export, cv.seg_card
    cards: list[str] = []

    def card_once_unavailable(*args, **kwargs):  # type: ignore[no-untyped-def]
        cards.append(str(args[1]))
        if len(cards) == 1:  # after MLflow made the version: Prefect retries the task
            raise ConnectionError("registry briefly unavailable")
        return real_card(*args, **kwargs)

    def fails(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise ExportCheckError("parity failed")

    monkeypatch.setattr(cv, "seg_card", card_once_unavailable)
    monkeypatch.setattr(cv, "export", fails)
    cfg = TINY_SEGMENTER.model_copy(update={"model_name": "resume-segmenter"})
    with pytest.raises(ExportCheckError):
        segment(work=work, config=cfg, preprocess_config=PRE, train_config=TRAIN, experiment="segment-resume")
    assert cards == ["1", "1"]  # the retry finished the version its first attempt made
    layout = WorkLayout(work)
    state = cv._state(layout)
    assert state["version"] == "1" and not state["complete"]
    fold_runs = {f: e["run_id"] for f, e in state["folds"].items()}
    monkeypatch.setattr(cv, "export", real_export)
    # Exported now, and the gate fails: still not complete (it was marked so at the export, and the
    # re-run started afresh and registered a second version).
    real_gate = cv.gate
    monkeypatch.setattr(cv, "gate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("gate down")))
    with pytest.raises(RuntimeError, match="gate down"):
        segment(work=work, config=cfg, preprocess_config=PRE, train_config=TRAIN, experiment="segment-resume")
    assert not cv._state(layout)["complete"]
    monkeypatch.setattr(cv, "gate", real_gate)
    result = segment(work=work, config=cfg, preprocess_config=PRE, train_config=TRAIN, experiment="segment-resume")
    assert cv._state(layout)["complete"]
    # The same run and version, exported now; no fold trained again, no second version.
    assert result["version"] == "1" and result["mlflow_run_id"] == state["parent_run_id"]
    assert {f: e["run_id"] for f, e in cv._state(layout)["folds"].items()} == fold_runs
    client = mlflow.tracking.MlflowClient(mlflow_env)
    assert len(client.search_model_versions("name = 'resume-segmenter'")) == 1
    assert version_has_onnx_of(client, "resume-segmenter", "1")


def test_a_student_distils_from_the_segmenter_fold_by_fold(seg_work: tuple[Path, Path], mlflow_env: str,
                                                           tmp_path: Path) -> None:
    """`--distill-from dicomops-ct-nodule-seg/V`: student fold i learns the slice scores of the
    segmenter's fold-i model on fold i's training series, the final student those of its final model."""
    import torch

    from dicomops.segmentation import actionable, teacher
    from dicomops.training import distill
    from dicomops.training.data import build_slab_set, load_volume
    from flows.train import train

    _, prepared = seg_work
    work = tmp_path / "work"
    shutil.copytree(prepared, work)
    seg = segment(work=work, config=TINY_SEGMENTER, preprocess_config=PRE, train_config=TRAIN, experiment="distil-seg")
    source = f"{TINY_SEGMENTER.model_name}/{seg['version']}"
    student_cfg = TRAIN.model_copy(update={"architecture": "mobilenet-v3-small", "model_name": "test-student",
                                           "distill_from": source})
    result = train(work=work, config=student_cfg, preprocess_config=PRE, experiment="distil-seg")
    client = mlflow.tracking.MlflowClient(mlflow_env)
    student = client.get_model_version("test-student", str(result["version"]))
    assert student.tags["distilled_from"] == source
    assert f"version {seg['version']} of {TINY_SEGMENTER.model_name}" in student.description
    # The classifier's flow likewise: a changed gate setting alone gates the version again, trains nothing.
    regated = train(work=work, config=student_cfg.model_copy(update={"min_auc": 0.0}), preprocess_config=PRE,
                    experiment="distil-seg")
    assert regated["skipped"] and (regated["version"], regated["mlflow_run_id"]) == (result["version"],
                                                                                     result["mlflow_run_id"])
    assert (regated["decision"], regated["promoted"]) == ("auto-promoted", True)

    # Each fold's segmenter scored exactly its fold's training series, the final one every series.
    layout = WorkLayout(work)
    folds, parent = layout.read_folds(), str(seg["mlflow_run_id"])
    runs = [distill.fold_run(mlflow_env, parent, fold) for fold in range(folds.n_splits)]
    code = teacher.scores_code()
    for fold, run in enumerate(runs):
        cached = sorted(p.stem.split("_")[0] for p in layout.segment.teacher_scores(run, code).glob("*.npy"))
        assert cached == sorted(folds.train(fold)), fold
    every = sorted(layout.labelled_series().SeriesInstanceUID)
    assert sorted(p.stem.split("_")[0] for p in layout.segment.teacher_scores(parent, code).glob("*.npy")) == every

    # The cached scores are the fold model's, read again from its MLflow run; the targets are them.
    model, cfg, pre = teacher.load_segmenter(mlflow_env, runs[0])
    paths = layout.preprocessed.read_index().set_index("SeriesInstanceUID").path
    level = actionable.solid_level(pre)
    assert level is not None
    for uid in folds.train(0)[:3]:
        fresh = teacher.series_slice_scores(model, load_volume(layout.preprocessed.volume(str(paths[uid]))), cfg, level)
        cached_file = layout.segment.teacher_score_file(layout.segment.teacher_scores(runs[0], code), uid, str(paths[uid]))
        assert np.allclose(np.load(cached_file), fresh, atol=1e-6), uid
    slabs = build_slab_set(layout, folds.train(0), PRE.slab_slices, TRAIN.input_size)
    targets = distill.teacher_targets(layout, mlflow_env, student_cfg.model_name, source, student.run_id, slabs, 0)
    scores = np.array([np.load(layout.segment.teacher_score_file(layout.segment.teacher_scores(runs[0], code), s,
                                                                 str(paths[s])))[z]
                       for s, z in zip(slabs.series, slabs.z, strict=True)])
    assert torch.allclose(targets, teacher.as_logits(scores))
    # Scores are keyed by the code that made them and the volume they were made from: neither other
    # segmentation code (another rule for a finding) nor a re-preprocessed volume reads them.
    folder = layout.segment.teacher_scores(runs[0], code)
    assert layout.segment.teacher_scores(runs[0], "0" * 64) != folder
    uid = folds.train(0)[0]
    assert layout.segment.teacher_score_file(folder, uid, "volumes/" + "a" * 32 + ".npz") != \
        layout.segment.teacher_score_file(folder, uid, str(paths[uid]))

    # A segmenter version from before its folds logged their models is refused with what to do.
    from urllib.parse import urlparse

    shutil.rmtree(Path(urlparse(client.get_run(runs[1]).info.artifact_uri).path) / "weights")
    with pytest.raises(ValueError, match=r"logged no segmenter for fold 1.*dicomops segment"):
        distill.teacher_targets(layout, mlflow_env, student_cfg.model_name, source, student.run_id, slabs, 1)
