"""Drift monitoring end to end, tiny: a champion with its stored reference; a same-distribution
batch leaves everything alone; a protocol-shift batch raises the alert (event, alerts.jsonl) and
starts exactly one retrain; a second drift inside the cooldown does not; a small batch is
'insufficient data'; nothing PHI reaches the alert."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pandas as pd
import pytest

import mlflow
from dicomops.config import (
    ExportConfig,
    IngestConfig,
    MonitorConfig,
    PipelineConfig,
    PreprocessConfig,
    SegmentConfig,
    SynthConfig,
    TrainConfig,
)
from dicomops.deid.scan import scan_for_phi
from dicomops.layout import WorkLayout
from dicomops.monitoring import alerts
from dicomops.monitoring.reference import TAG, load_serving
from dicomops.synthetic import generate_corpus
from dicomops.tracking import registry
from dicomops.tracking.lineage import SOURCE_HASH_TAG
from flows.monitor import monitor
from flows.pipeline import pipeline
from flows.retrain import retrain

pytestmark = pytest.mark.usefixtures("prefect_harness")
NAME = "monitor-test-classifier"


def _config(source: Path) -> PipelineConfig:
    return PipelineConfig(
        ingest=IngestConfig(workers=1),
        preprocess=PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), crop_xy=160, workers=1),
        # The gate's outcomes are fixed: the first version has no champion to beat and min_auc 0, so it
        # is promoted; a later one would have to beat it by more than 1.0 AUC, so it waits for review.
        train=TrainConfig(epochs=1, input_size=32, batch_size=16, num_workers=0, model_name=NAME, min_auc=0.0,
                          promotion_margin=1.0),
        export=ExportConfig(parity_samples=16, calibration_samples=16, max_batch=8, preferred_batch_sizes=(8,),
                            int8_max_auc_drop=1.0),
        monitor=MonitorConfig(training_source=source, min_series=8),
        segment=SegmentConfig(enabled=False),  # drift watches the classifier
        experiment="monitor-test")


# A retrain also retrains the segmenter on the same pool: tiny, and (min_cpm 1.0) never promoted.
TINY_SEGMENTER = SegmentConfig(channels=(4, 8), strides=(2,), patch=(16, 16, 16), roi=(48, 48, 16), batch_size=4,
                               patches_per_epoch=8, epochs=1, model_name="monitor-test-segmenter", min_cpm=1.0)


def _synth(root: Path, name: str, patients: int, seed: int, scenario: str) -> Path:
    out = root / name
    generate_corpus(out, SynthConfig(patients=patients, seed=seed, scenario=scenario, fault_rate=0.0, matrix=128,
                                     slices=12, workers=1))
    return out


def _needles(corpus: Path) -> set[str]:
    phi = pd.read_csv(corpus / "phi.csv", keep_default_na=False)
    labels = pd.read_csv(corpus / "labels.csv", keep_default_na=False)
    return set(phi.value) | set(labels.SeriesInstanceUID) | set(labels.StudyInstanceUID) | set(labels.PatientID)


def _drift_events(expected: int, timeout: float = 30.0) -> list[dict]:
    """Drift events as the Prefect API stored them (events arrive a few seconds after emission)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    async def read() -> list[dict]:
        async with get_client() as client:
            page = await client.read_events(filter=EventFilter(event=EventNameFilter(name=[alerts.EVENT])), limit=50)
            return [json.loads(e.model_dump_json()) for e in page.events]

    deadline = time.monotonic() + timeout
    while True:
        events = asyncio.run(read())
        if len(events) >= expected or time.monotonic() > deadline:
            return events
        time.sleep(1.0)


def _assert_compared_on_the_retrain_pool(uri: str, work: Path, retrain_work: Path, champion: str, reasons: str) -> None:
    """The retrained classifier met the champion on the retrain's pool and folds: the champion's stored
    out-of-fold scores for the 20 series of its own pool, its fold models for the batches' series."""
    from dicomops.training.champion_pool import champion_on_pool

    pool = pd.read_parquet(WorkLayout(retrain_work).train.oof_predictions)
    own = pd.read_parquet(WorkLayout(work).train.oof_predictions)
    assert len(own) == 20 and set(own.SeriesInstanceUID) < set(pool.SeriesInstanceUID)  # the same pseudonyms
    assert reasons.split("; ")[0] == BASIS.format(champion)
    compared = champion_on_pool(retrain_work, uri, NAME, champion)
    assert (compared.series, compared.rescored) == (len(pool), len(pool) - 20)
    assert compared.champion is not None and f"champion {compared.champion.mean_auc:.4f}" in reasons


BASIS = ("compared on this version's pool, labels and folds: champion v{} by the models of its cross-validation, "
         "each series scored by one that never trained on its patient")


def _dvc_repository(root: Path) -> None:
    """`root` as the project is: git and DVC, a default remote, and the work directory git-ignored."""
    import subprocess
    import sys

    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(root / "remote")], cwd=root,
                   check=True, capture_output=True)
    (root / ".gitignore").write_text("/work/\n/remote/\n")


def test_monitor_alerts_and_retrains_once_and_leaves_same_distribution_alone(tmp_path: Path, mlflow_env: str) -> None:
    _dvc_repository(tmp_path)  # the work directory lies in the project, as `make run`'s does
    source = _synth(tmp_path, "data", 20, 17, "baseline")
    cfg = _config(source)
    work = tmp_path / "work"
    # With the segmenter, made champion by hand (min_cpm 1.0): the retrain's segmenter meets it on its pool.
    trained = pipeline(src=source, config=cfg.model_copy(update={"segment": TINY_SEGMENTER}), work=work)
    client = mlflow.tracking.MlflowClient(mlflow_env)
    registry.promote(mlflow_env, TINY_SEGMENTER.model_name, str(trained["segmenter_version"]), "test")
    first = client.get_model_version(NAME, str(trained["model_version"]))
    assert first.tags["promotion.decision"] == "auto-promoted"
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == str(first.version)
    registry.promote(mlflow_env, NAME, trained["model_version"], "test")
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.tags[TAG] == f"runs:/{champion.run_id}/monitoring/reference.parquet"
    serving = load_serving(mlflow_env, NAME)
    assert serving.version == str(champion.version) and len(serving.reference) == 20
    assert {"Manufacturer", "noise_hu", "probability", "emb_0"} <= set(serving.reference.columns)
    assert not any("UID" in c or "Patient" in c for c in serving.reference.columns)

    same = monitor(src=_synth(tmp_path, "same", 12, 41, "baseline-new"), work=work, config=cfg)
    assert same["status"] == "no drift" and same["retrain"] is None
    assert alerts.read_alerts(work) == []

    small = monitor(src=_synth(tmp_path, "small", 4, 43, "protocol-shift"), work=work, config=cfg)
    assert small["status"] == "insufficient data" and small["retrain"] is None

    shifted_src = _synth(tmp_path, "shifted", 12, 42, "protocol-shift")
    with_segmenter = cfg.model_copy(update={"segment": TINY_SEGMENTER})
    shifted = monitor(src=shifted_src, work=work, config=with_segmenter)
    assert shifted["status"] == "drift"
    assert {"SliceThickness", "ConvolutionKernel"} <= set(shifted["drifted_columns"])
    retrained = shifted["retrain"]
    assert retrained["status"] == "retrained" and retrained["sources"] == 4  # corpus + the three labelled batches
    version = client.get_model_version(NAME, str(retrained["version"]))
    assert version.tags["trigger"] == "drift" and version.tags["monitoring_run_id"] == shifted["monitoring_run_id"]
    assert version.tags["promotion.decision"] == "awaiting-review" and retrained["promoted"] is False
    assert "not above margin 1.0000" in version.tags["promotion.reasons"]
    # The pool it learned from is a DVC version: its pointer is on the run, its md5 the run's data hash.
    pool, retrain_run = WorkLayout(work).retrain_sources, client.get_run(str(retrained["mlflow_run_id"]))
    assert version.tags["retrain.pool.dvc"] == str(pool.with_name("src.dvc"))
    assert version.tags["retrain.pool.dvc_md5"] == retrain_run.data.tags[SOURCE_HASH_TAG]
    assert [a.path for a in client.list_artifacts(retrain_run.info.run_id, "data")] == ["data/src.dvc"]
    assert (tmp_path / "remote" / "files" / "md5").is_dir()  # pushed
    _assert_compared_on_the_retrain_pool(mlflow_env, work, Path(retrained["work"]), str(first.version),
                                         version.tags["promotion.reasons"])
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == str(first.version)
    assert version.tags["export.onnx.sha256"]
    segmenter = client.get_model_version(TINY_SEGMENTER.model_name, str(retrained["segmenter_version"]))
    assert segmenter.tags["trigger"] == "drift" and segmenter.tags["monitoring_run_id"] == shifted["monitoring_run_id"]
    assert segmenter.tags["export.onnx.sha256"] and retrained["segmenter_promoted"] is False
    # Judged again on the retrain's series and references, each by the fold model clear of its patient
    # (dicomops.segmentation.champion_pool): every series of the pool, the batches' included.
    from dicomops.segmentation.champion_pool import champion_on_pool as segmenter_on_pool

    seg_reasons = segmenter.tags["promotion.reasons"]
    assert seg_reasons.split("; ")[0] == BASIS.format(trained["segmenter_version"]), seg_reasons
    judged = segmenter_on_pool(Path(retrained["work"]), mlflow_env, TINY_SEGMENTER.model_name,
                               str(trained["segmenter_version"]))
    pool = len(pd.read_parquet(WorkLayout(Path(retrained["work"])).train.oof_predictions))
    assert judged.champion is not None and (judged.series, judged.rescored) == (pool, pool)
    assert f"champion {judged.champion.mean_auc:.4f}" in seg_reasons
    records = alerts.read_alerts(work)
    assert len(records) == 1 and records[0]["monitoring_run_id"] == shifted["monitoring_run_id"]
    assert "SliceThickness" in records[0]["drifted_columns"]
    monitoring_run = client.get_run(str(shifted["monitoring_run_id"]))
    assert monitoring_run.data.tags["drift.status"] == "drift"
    assert {"drift/report.html", "drift/summary.json", "drift/drift_share_history.png"} <= \
        {a.path for a in client.list_artifacts(monitoring_run.info.run_id, "drift")}

    # An alert with nothing new to learn (the same labelled pool: no batch or reader's label since)
    # is skipped without using the cooldown, whatever the cooldown says.
    no_cooldown = cfg.model_copy(update={"monitor": cfg.monitor.model_copy(update={"cooldown_hours": 0.0})})
    nothing_new = retrain(work=work, config=no_cooldown, trigger="drift", monitoring_run_id="run-x")
    assert nothing_new["status"] == "skipped" and "nothing new to learn" in str(nothing_new["reason"])
    assert f"version {retrained['version']}" in str(nothing_new["reason"])
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 2

    again = monitor(src=_synth(tmp_path, "shifted-2", 12, 44, "protocol-shift"), work=work, config=cfg)
    assert again["status"] == "drift"
    assert again["retrain"]["status"] == "skipped" and "cooldown" in again["retrain"]["reason"]
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 2  # exactly one retrain happened
    assert len(alerts.read_alerts(work)) == 2

    events = _drift_events(expected=2)
    assert len(events) == 2
    assert events[0]["resource"]["prefect.resource.id"] == f"dicomops.model.{NAME}"
    needles = _needles(shifted_src) | _needles(source)
    dump = tmp_path / "alert-dump"
    dump.mkdir()
    (dump / "events.json").write_text(json.dumps(events))
    (dump / "alerts.jsonl").write_bytes((work / "alerts.jsonl").read_bytes())
    for run in (monitoring_run.info.run_id,):
        client.download_artifacts(run, "drift", str(dump))
    client.download_artifacts(str(retrained["mlflow_run_id"]), "data", str(dump))  # the pool's DVC pointer
    (dump / "retrain-tags.json").write_text(json.dumps(client.get_run(str(retrained["mlflow_run_id"])).data.tags))
    assert (dump / "data" / "src.dvc").is_file()
    assert scan_for_phi(dump, needles) == []
    assert len(scan_for_phi(shifted_src / "case-00001", needles)) > 5  # the scan is not vacuous
