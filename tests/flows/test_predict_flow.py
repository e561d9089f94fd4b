"""Batch inference on a folder: the flow, the library and the training's own scoring agree; a
folder the gate refuses is an answer, not a crash; the result table, the summary and the MLflow run
name studies by token or pseudonym only."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mlflow
from dicomops.deid import scan_for_phi
from dicomops.serving.batch import EXPERIMENT, predict_folder, result_table
from dicomops.serving.champion import load_champion
from dicomops.training.data import load_volume
from dicomops.training.model import load_trained
from dicomops.training.scoring import score_series
from flows.predict import predict
from tests.champion_fixture import CONFIG, KEY, TINY, ExportedChampion
from tests.unit.test_real_files import _needles

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture()
def env(exported_champion: ExportedChampion, monkeypatch: pytest.MonkeyPatch) -> ExportedChampion:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", exported_champion.uri)
    monkeypatch.setenv("DICOMOPS_MLFLOW_ARTIFACT_ROOT", str(exported_champion.artifacts))
    monkeypatch.setenv("DICOMOPS_DEID_KEY", KEY.decode())
    monkeypatch.delenv("DICOMOPS_REDIS_URL", raising=False)
    return exported_champion


def test_the_flow_the_library_and_training_agree_and_nothing_identifies(env: ExportedChampion, tmp_path: Path) -> None:
    src = env.work.parent / "src"
    champion = load_champion(env.uri, TINY.model_name, models_dir=tmp_path / "models")
    assert champion.engine.choice.kind == "ort-fp32" and "TensorRT not used" in champion.engine.choice.reason
    library = result_table(predict_folder(src, tmp_path / "lib", CONFIG.ingest, KEY, champion), champion)

    work = tmp_path / "work"
    result = predict(src=src, work=work, config=CONFIG)
    flow = pd.read_csv(result["results"], keep_default_na=False, float_precision="round_trip")
    assert result["studies_scored"] == 20 and result["series_scored"] == 20 == len(flow)
    assert list(flow.series) == list(library.series)
    assert np.array_equal(flow.score.to_numpy(), library.score.to_numpy().astype(float))  # exactly
    assert (flow.present == (flow.score >= champion.threshold)).all()

    # The training's own scoring (torch, the cached volumes of the training work directory) gives the
    # same series scores: same gate pseudonyms, same preprocessing, the exported engine within parity.
    model, train_cfg, _ = load_trained(env.uri, champion.run_id)
    from dicomops.layout import WorkLayout

    pre = WorkLayout(env.work).preprocessed
    index = pre.read_index().assign(label=0)
    reference = score_series(model, index.itertuples(), (load_volume(pre.volume(p)) for p in index.path),
                             champion.contract.channels, train_cfg.input_size, train_cfg.top_k_slices)
    merged = flow.merge(reference, left_on="series", right_on="SeriesInstanceUID")
    assert len(merged) == 20
    assert np.abs(merged.score_x - merged.score_y).max() < 1e-5

    run = mlflow.get_run(result["mlflow_run_id"])
    assert mlflow.get_experiment(run.info.experiment_id).name == EXPERIMENT
    assert run.data.params["engine"] == "ort-fp32" and run.data.params["version"] == champion.version
    assert run.data.metrics["series_scored"] == 20 and run.data.metrics["latency_p95_s"] > 0
    needles = _needles(sorted(p for p in src.rglob("*.dcm")))
    assert len(needles) > 40
    for place in (work, env.artifacts):
        assert scan_for_phi(place, needles) == [], place


def test_a_folder_the_gate_refuses_is_an_answer(env: ExportedChampion, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(5):
        (bad / f"{i}.dcm").write_bytes(b"not DICOM at all " * 20)
    result = predict(src=bad, work=tmp_path / "work", config=CONFIG)
    assert result["studies_scored"] == 0
    table = pd.read_csv(result["results"], keep_default_na=False)
    assert table.status.tolist() == ["refused"] and "quarantine" in table.reason[0].lower()
    # It says why, and points to no file of the gate's scratch folder, which is gone.
    assert "Top reasons: not_dicom (5)" in table.reason[0] and str(tmp_path) not in table.reason[0]
    # Counted, and said, as the refusal it is (it was "0 refused, 0 quarantined" before): the CLI exits 1.
    assert result["batch_refused"] == 1 and result["quarantined_files"] == 5
    assert result["refused"] == table.reason[0]
    shutil.rmtree(bad)
