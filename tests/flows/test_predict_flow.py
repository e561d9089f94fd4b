"""Batch inference on a folder: the flow, the library and the training's own scoring agree; a
folder the gate refuses is an answer, not a crash; each study is judged on its own (a bad study is
a refused row of its own, a series that cannot be scored a failed row of its own); an outage keeps
what was answered before it; the result table, the summary and the MLflow run name studies by token
or pseudonym only."""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from pydicom.uid import JPEGBaseline8Bit, RLELossless, generate_uid
from typer.testing import CliRunner

import mlflow
from dicomops.cli import app
from dicomops.config import PipelineConfig, ServeConfig
from dicomops.deid import scan_for_phi
from dicomops.deid.keys import KeyedMapper
from dicomops.serving import predict as served_path
from dicomops.serving.batch import EXPERIMENT, predict_folder, result_table, run_batch
from dicomops.serving.champion import load_champion
from dicomops.training.data import load_volume
from dicomops.training.model import load_trained
from dicomops.training.scoring import SeriesRule, score_series
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
    assert result["series_rule"] == champion.rule.kind == "top_k_contrast"  # the rule it trained with, named
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
                             champion.contract.channels, train_cfg.input_size, SeriesRule.of(train_cfg))
    merged = flow.merge(reference, left_on="series", right_on="SeriesInstanceUID")
    assert len(merged) == 20
    assert np.abs(merged.score_x - merged.score_y).max() < 1e-5

    run = mlflow.get_run(str(result["mlflow_run_id"]))
    assert mlflow.get_experiment(run.info.experiment_id).name == EXPERIMENT
    assert run.data.params["engine"] == "ort-fp32" and run.data.params["version"] == champion.version
    assert run.data.metrics["series_scored"] == 20 and run.data.metrics["latency_p95_s"] > 0
    needles = _needles(sorted(p for p in src.rglob("*.dcm")))
    assert len(needles) > 40
    for place in (work, env.artifacts):
        assert scan_for_phi(place, needles) == [], place


@pytest.mark.parametrize(("engine", "baseline", "tolerance"), [("ov-fp32", "ort-fp32", 1e-5), ("ov-int8", "ort-int8", 0.02)])
def test_openvino_scores_what_onnx_runtime_scores_on_the_same_file_and_nothing_identifies(
        env: ExportedChampion, tmp_path: Path, engine: str, baseline: str, tolerance: float) -> None:
    src = env.work.parent / "src"
    tables = {}
    for kind in (baseline, engine):
        config = CONFIG.model_copy(update={"serve": CONFIG.serve.model_copy(update={"engine": kind})})
        result = predict(src=src, work=tmp_path / kind, config=config)
        assert result["engine"] == kind and result["series_scored"] == 20
        assert mlflow.get_run(str(result["mlflow_run_id"])).data.params["engine"] == kind
        tables[kind] = pd.read_csv(result["results"], keep_default_na=False, float_precision="round_trip")
    ours, theirs = tables[engine], tables[baseline]
    assert list(ours.series) == list(theirs.series)
    assert np.abs(ours.score.to_numpy() - theirs.score.to_numpy()).max() < tolerance
    needles = _needles(sorted(p for p in src.rglob("*.dcm")))
    for place in (tmp_path / engine, env.artifacts):  # the work directory and MLflow's store
        assert scan_for_phi(place, needles) == [], place


@pytest.mark.parametrize("engine", ["ort-int8", "ov-int8"])
def test_an_int8_file_whose_series_check_failed_is_refused_before_anything_is_scored(
        env: ExportedChampion, tmp_path: Path, engine: str) -> None:
    """The registered champion's export, the engine's own verdict set to a failed series check (as the
    demo's post-training INT8 gets on both runtimes): `dicomops predict` on that INT8 engine stops
    with the verdict and writes no result; FP32 still scores."""
    from dicomops.export.quantize import SERIES_CHECK_TAGS

    tag = SERIES_CHECK_TAGS[engine]
    client = mlflow.tracking.MlflowClient(env.uri)
    version = client.get_model_version_by_alias(TINY.model_name, "champion")
    passed = version.tags[tag]
    assert passed.startswith("passed: ")  # the fixture's export ran the engine's check (int8_max_auc_drop 1.0)
    failed = "failed: series AUC 0.9910 -> 0.8416 over 30 series, scores moved by up to 0.631"
    client.set_model_version_tag(TINY.model_name, version.version, tag, failed)
    try:
        config = CONFIG.model_copy(update={"serve": CONFIG.serve.model_copy(update={"engine": engine})})
        with pytest.raises(ValueError, match=r"which its export's check refused: failed: series AUC 0\.9910"):
            predict(src=env.work.parent / "src", work=tmp_path / engine, config=config)
        assert not list((tmp_path / engine).rglob("*.csv"))  # no result table, no answer
        assert predict(src=env.work.parent / "src", work=tmp_path / "fp32", config=CONFIG)["series_scored"] == 20
    finally:
        client.set_model_version_tag(TINY.model_name, version.version, tag, passed)


def test_openvino_serves_a_file_only_onnx_runtime_failed_on(env: ExportedChampion, tmp_path: Path) -> None:
    """Each INT8 engine is judged on its own series scores: with ONNX Runtime's verdict failed and
    OpenVINO's (as the fixture's export gave it) passed, the real registry's champion is scored on
    ov-int8 and refused on ort-int8."""
    from dicomops.export.quantize import OV_SERIES_CHECK_TAG, SERIES_CHECK_TAG

    client = mlflow.tracking.MlflowClient(env.uri)
    version = client.get_model_version_by_alias(TINY.model_name, "champion")
    passed = version.tags[SERIES_CHECK_TAG]
    assert version.tags[OV_SERIES_CHECK_TAG].startswith("passed: ")
    client.set_model_version_tag(TINY.model_name, version.version, SERIES_CHECK_TAG,
                                 "failed: series AUC 0.9910 -> 0.8416 over 30 series, scores moved by up to 0.631")
    try:
        def on(engine: str) -> PipelineConfig:
            return CONFIG.model_copy(update={"serve": CONFIG.serve.model_copy(update={"engine": engine})})

        assert predict(src=env.work.parent / "src", work=tmp_path / "ov", config=on("ov-int8"))["series_scored"] == 20
        with pytest.raises(ValueError, match=r"ort-int8 would serve the INT8 file"):
            predict(src=env.work.parent / "src", work=tmp_path / "ort", config=on("ort-int8"))
        assert not list((tmp_path / "ort").rglob("*.csv"))
    finally:
        client.set_model_version_tag(TINY.model_name, version.version, SERIES_CHECK_TAG, passed)


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


# --------------------------------------------------------------------------------------------------
# each study on its own
# --------------------------------------------------------------------------------------------------
def _cases(env: ExportedChampion) -> list[Path]:
    return sorted((env.work.parent / "src").glob("case-*"))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _truncated(case: Path, dest: Path) -> None:
    """The study as a bad disk copy left it: every file cut to a third (headers whole, pixels short)."""
    for f in _files(case):
        out = dest / f.relative_to(case)
        out.parent.mkdir(parents=True, exist_ok=True)
        data = f.read_bytes()
        out.write_bytes(data[: len(data) // 3])


def _rewritten(case: Path, dest: Path, change: Callable[[pydicom.Dataset], None], enforce: bool = True) -> None:
    for f in _files(case):
        ds = pydicom.dcmread(f)
        change(ds)
        out = dest / f.relative_to(case)
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=enforce)


def _study_uid(case: Path) -> str:
    return str(pydicom.dcmread(_files(case)[0], stop_before_pixels=True).StudyInstanceUID)


def _leak_needles(env: ExportedChampion, folder: Path) -> set[str]:
    """The corpus's PHI, every identifying value and original UID of the files scored, the folder's path."""
    phi = pd.read_csv(env.work.parent / "src" / "phi.csv", keep_default_na=False)
    return set(phi.value) | _needles(_files(folder)) | {str(folder)}


def _nothing_identifies(env: ExportedChampion, folder: Path, *places: Path) -> None:
    needles = _leak_needles(env, folder)
    assert len(needles) > 20
    for place in (*places, env.artifacts):
        assert scan_for_phi(place, needles) == [], place


def test_each_study_is_gated_on_its_own_and_a_bad_one_refuses_only_itself(env: ExportedChampion,
                                                                          tmp_path: Path) -> None:
    """Two thirds of the folder's files are quarantined (a study of truncated files, a PET study):
    the whole folder was refused and the good study never scored (until 2026-12-06). Now each
    study is held to the gate's share on its own files, as pacs-watch holds a study it retrieved."""
    good, cut, pet = _cases(env)[:3]
    folder = tmp_path / "in"
    shutil.copytree(good, folder / "good")
    _truncated(cut, folder / "cut")

    def as_pet(ds: pydicom.Dataset) -> None:
        ds.Modality = "PT"

    _rewritten(pet, folder / "pet", as_pet)
    work = tmp_path / "work"
    result = predict(src=folder, work=work, config=CONFIG)
    assert (result["batch_refused"], result["studies"], result["studies_scored"], result["studies_refused"]) == \
        (0, 3, 1, 2)
    assert "refused" not in result and result["quarantined_files"] == 24
    table = pd.read_csv(result["results"], keep_default_na=False).set_index("study")
    mapper = KeyedMapper(KEY)
    scored = table.loc[mapper.uid(_study_uid(good))]
    assert scored.status == "scored" and 0 <= float(scored.score) <= 1
    assert scored.present == str(float(scored.score) >= float(scored.threshold))
    refused = {mapper.uid(_study_uid(cut)): "truncated (12)", mapper.uid(_study_uid(pet)): "wrong_modality (12)"}
    for study, reason in refused.items():
        row = table.loc[study]
        assert row.status == "refused" and row.series == "" and f"Top reasons: {reason}" in row.reason
        assert "12 of the study's 12 files quarantined" in row.reason
    _nothing_identifies(env, folder, work)


def test_a_study_whose_files_are_all_quarantined_is_a_refused_row_of_its_own(env: ExportedChampion,
                                                                             tmp_path: Path) -> None:
    """Below the share, a study of truncated files was one anonymous "(quarantined files)" row and
    was not counted (until 2026-12-06): now it is refused under its pseudonym with its reasons, and
    counted; only files whose study cannot be read stay in that row."""
    a, b, cut = _cases(env)[3:6]
    folder = tmp_path / "in"
    for case in (a, b):
        shutil.copytree(case, folder / case.name)
    _truncated(cut, folder / "cut")
    for i in range(2):
        (folder / f"junk-{i}.dcm").write_bytes(b"not DICOM at all " * 20)
    work = tmp_path / "work"
    result = predict(src=folder, work=work, config=CONFIG)
    table = pd.read_csv(result["results"], keep_default_na=False)
    study = KeyedMapper(KEY).uid(_study_uid(cut))
    assert table.status.tolist().count("scored") == 2
    (row,) = table[table.study == study].itertuples()
    assert row.status == "refused" and "Top reasons: truncated (12)" in row.reason
    (unread,) = table[table.study == "(quarantined files)"].itertuples()
    assert "2 files quarantined" in unread.reason and "not_dicom: 2" in unread.reason
    summary = json.loads((Path(str(result["results"])).parent / "summary.json").read_text())["metrics"]
    assert (summary["studies"], summary["studies_scored"], summary["studies_refused"]) == (3, 2, 1)
    assert summary["quarantined_files"] == 14
    _nothing_identifies(env, folder, work)


def test_a_series_that_cannot_be_scored_fails_alone_and_the_cli_exits_1(env: ExportedChampion,
                                                                        tmp_path: Path) -> None:
    """A study with a good series and one whose pixels cannot be decoded (its transfer syntax says
    JPEG, its pixels are native): the whole study failed with a withheld message, and the CLI said
    "predict finished" with exit 0 (until 2026-12-06). Now the good series is scored, the other is a
    failed row with the preprocessing's reason code, and the command exits 1 saying so."""
    # A Philips study: its pixels are RLE fragments, which no JPEG decoder reads.
    case = next(c for c in _cases(env)[9:] if pydicom.dcmread(_files(c)[0], stop_before_pixels=True)
                .file_meta.TransferSyntaxUID == RLELossless)
    folder = tmp_path / "in"
    shutil.copytree(case, folder / "study")
    series = generate_uid()

    def broken(ds: pydicom.Dataset) -> None:
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit

    _rewritten(case / "series-1", folder / "study" / "series-2", broken, enforce=False)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"train": CONFIG.train.model_dump(mode="json"),
                                      "ingest": CONFIG.ingest.model_dump(mode="json")}))
    work = tmp_path / "work"
    said = CliRunner().invoke(app, ["predict", str(folder), "--work", str(work), "--config", str(config)],
                              env={"COLUMNS": "200"})
    output = " ".join(said.output.split())
    assert said.exit_code == 1, said.output
    assert "not everything was answered" in output and "1 series not scored, without a result written back" in output
    (results,) = (work / "predict").glob("*/results.csv")
    table = pd.read_csv(results, keep_default_na=False)
    mapper = KeyedMapper(KEY)
    original = str(pydicom.dcmread(_files(case)[0], stop_before_pixels=True).SeriesInstanceUID)
    assert set(table.study) == {mapper.uid(_study_uid(case))}
    rows = table.set_index("series")
    assert rows.loc[mapper.uid(original)].status == "scored" and 0 <= float(rows.loc[mapper.uid(original)].score) <= 1
    failed = rows.loc[mapper.uid(series)]
    assert failed.status == "failed" and failed.reason == "series not scored: unreadable_pixels"
    assert failed.score == "" and failed.slices == ""
    summary = json.loads((results.parent / "summary.json").read_text())["metrics"]
    assert (summary["studies_scored"], summary["series_scored"], summary["series_failed"]) == (1, 1, 1)
    needles = _leak_needles(env, folder)
    assert not [n for n in needles if n in said.output]
    _nothing_identifies(env, folder, work)


def test_an_outage_part_way_through_a_folder_keeps_the_studies_answered_before_it(
        env: ExportedChampion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while the second study is preprocessed: the first study's score was lost and no
    run was logged (until 2026-12-06). Now it is recorded and the run ends FAILED, as from a PACS."""
    first, second = _cases(env)[7:9]
    folder = tmp_path / "in"
    for case in (first, second):
        shutil.copytree(case, folder / case.name)
    calls = []
    real = served_path.preprocess_series

    def disk_full_on_the_second(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(served_path, "preprocess_series", disk_full_on_the_second)
    work = tmp_path / "work"
    with pytest.raises(OSError, match="No space left"):
        run_batch(src=folder, query=None, work=work, ingest_cfg=CONFIG.ingest, serve_cfg=ServeConfig(),
                  model_name=TINY.model_name, version=None, key=KEY, tracking_uri=env.uri,
                  artifact_root=env.artifacts, staging=tmp_path / "staging")
    (results,) = (work / "predict").glob("*/results.csv")
    table = pd.read_csv(results, keep_default_na=False)
    assert table.status.tolist() == ["scored"] and len(calls) == 2
    summary = json.loads((results.parent / "summary.json").read_text())
    (run,) = mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string=f"params.batch = '{summary['batch']}'",
                                output_format="list")
    assert run.info.status == "FAILED" and run.data.tags["dicomops.batch.stopped"] == "OSError"
    assert run.data.metrics["studies_scored"] == 1
    _nothing_identifies(env, folder, work)
