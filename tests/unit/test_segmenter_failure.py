"""A study of two series, the segmenter failing on one, through the one path pacs-watch, ``predict
--pacs`` and the online service share (:func:`dicomops.pacs.watch.build_reports`): the whole study
failed and nothing went back, not even the classifier's SRs that were ready (until 2026-12-07). Now
the series the segmenter failed on goes back with its classifier's SR and none of the segmenter's
objects (its SR, built before the failure, is not sent without its SEG), the other series with all
three, and the study is recorded as partly answered with the code ``segmenter_failed:<type>``
(ledger, the pass's counts, the online answer), never the error's message; it keeps no manifest in
the cache and is not the watch's ``answered`` row. A full disk still stops the study. On the tiny
exported champion, the density segmenter (:mod:`tests.segmenter_fixture`) and a synthetic study
with two nodules (fixed seeds); ``tests/integration/test_pacs_partial.py`` runs the same through a
real Orthanc."""

from __future__ import annotations

import copy
import dataclasses
import errno
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import generate_uid

import dicomops.segmentation.native as native
from dicomops.config import SegmentConfig
from dicomops.deid import scan_for_phi
from dicomops.deid.keys import KeyedMapper
from dicomops.export.onnx_export import session
from dicomops.layout import WorkLayout
from dicomops.pacs import watch
from dicomops.serving.champion import Champion, load_champion
from dicomops.serving.predict import Answer, SeriesFailure, SeriesFinding, answer_pacs_study
from dicomops.serving.segmenter import Segmenter
from dicomops.synthetic.corpus import SeriesPlan, write_series
from tests.champion_fixture import CONFIG, KEY, PRE, TINY, ExportedChampion
from tests.segmenter_fixture import density_graph
from tests.unit.test_partial_study import FolderPacs, evidence_series, study_uid_of
from tests.unit.test_real_files import _needles

SEGMENTER = "density"


def two_series_study(out: Path, index: int) -> tuple[list[Path], list[str]]:
    """A synthetic siemens study (fake PHI, two solid nodules the density segmenter finds) under
    ``out/study``: its series and a copy of it under other series and instance UIDs, both scorable.
    Returns the study's files and the two series' UIDs."""
    plan = SeriesPlan(index=index, seed=41, scenario="baseline", vendor="siemens", label=1, nodule_count=2,
                      fault=None, fault_detail="", matrix=128, slices=16)
    result = write_series(plan, out / "src")
    source = sorted(p for p in (out / "src" / str(result.label_row["series_dir"])).iterdir() if p.is_file())
    study = out / "study"
    uids = [str(pydicom.dcmread(source[0], stop_before_pixels=True).SeriesInstanceUID),
            generate_uid(entropy_srcs=[f"segmenter-failure-{index}"])]
    (study / "series-1").mkdir(parents=True)
    (study / "series-2").mkdir()
    for k, f in enumerate(source):
        shutil.copy(f, study / "series-1" / f.name)
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SeriesNumber = uids[1], 5
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[f"segmenter-failure-{index}-{k}"])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(study / "series-2" / f.name, enforce_file_format=False)
    shutil.rmtree(out / "src")
    return sorted(p for p in study.rglob("*") if p.is_file()), uids


class Cache:
    """A volume cache in memory: what the watch and the online service put and get."""

    def __init__(self) -> None:
        self.volumes: dict[str, Any] = {}
        self.manifests: dict[str, Any] = {}

    def get_volume(self, key: str) -> Any:
        return self.volumes.get(key)

    def put_volume(self, key: str, volume: Any) -> None:
        self.volumes[key] = volume

    def get_manifest(self, digest: str) -> Any:
        return self.manifests.get(digest)

    def put_manifest(self, digest: str, manifest: Any) -> None:
        self.manifests[digest] = manifest


@pytest.fixture(scope="module")
def champion(exported_champion: ExportedChampion, tmp_path_factory: pytest.TempPathFactory) -> Champion:
    """The tiny classifier with the density segmenter on it, writing SEGs."""
    models = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DICOMOPS_MLFLOW_ARTIFACT_ROOT", str(exported_champion.artifacts))
        classifier = load_champion(exported_champion.uri, TINY.model_name, models_dir=models)
    cfg = SegmentConfig(channels=(4, 8), strides=(2,), patch=(16, 16, 16), roi=(16, 16, 16), model_name=SEGMENTER)
    segmenter = Segmenter(SEGMENTER, "1", "run", PRE, cfg, session(density_graph(models / "density.onnx")))
    return dataclasses.replace(classifier, segmenter=segmenter, write_seg=True)


def failing_on(monkeypatch: pytest.MonkeyPatch, target: str, error: BaseException) -> list[str]:
    """The segmenter's part fails for the series of pseudonym `target` after its SR was built (laying
    its findings onto the acquired slices raises `error`); the others run as they are. Returns the
    pseudonyms it failed on."""
    real = watch.localisation_reports
    failed: list[str] = []

    def flaky(images: list[Any], group: pd.DataFrame, deid_root: Path, segmenter: Any, write_seg: bool = True,
              series: str = "") -> tuple[list[Any], Any]:
        if series != target:
            return real(images, group, deid_root, segmenter, write_seg, series)

        def raises(*args: Any, **kwargs: Any) -> np.ndarray:
            failed.append(series)
            raise error

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(native, "to_native_mask", raises)
            return real(images, group, deid_root, segmenter, write_seg, series)

    monkeypatch.setattr(watch, "localisation_reports", flaky)
    return failed


def by_kind(stored: list[Any]) -> dict[tuple[str, str], set[str]]:
    """What went back, by (modality, the model that made it): the original series each answers."""
    kinds: dict[tuple[str, str], set[str]] = {}
    for ds in stored:
        series = evidence_series(ds) if ds.Modality == "SR" else \
            {str(s.SeriesInstanceUID) for s in ds.ReferencedSeriesSequence}
        kinds.setdefault((str(ds.Modality), str(ds.ManufacturerModelName)), set()).update(series)
    return kinds


def phi_message(files: list[Path]) -> str:
    """An error message that quotes header values, as highdicom's do."""
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return f"Source image {ds.SOPInstanceUID} of {ds.PatientName} ({ds.PatientID}) has no shared orientation"



def _assert_watch_leaked_nothing(files: list[Path], work: Path, logs: str, outcome: object) -> None:
    """The failure's message quoted the study's PHI (checked, so the scan is not vacuous): neither the
    watch's work directory, nor its logs, nor the outcome it recorded holds any of it."""
    needles = _needles(files)
    assert [n for n in needles if n in phi_message(files)]  # not vacuous
    assert scan_for_phi(work, needles) == [] and not [n for n in needles if n in logs]
    assert not [n for n in needles if n in repr(outcome)]

def test_the_watch_sends_the_classifier_s_srs_and_the_other_series_segmenter_objects_and_records_the_failure(
        champion: Champion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    files, (first, second) = two_series_study(tmp_path, index=91)
    mapper = KeyedMapper(KEY)
    failed_on = failing_on(monkeypatch, mapper.uid(first), ValueError(phi_message(files)))
    pacs, work, staging, cache = FolderPacs(files), tmp_path / "work", tmp_path / "staging", Cache()
    study = study_uid_of(files)
    with caplog.at_level(logging.INFO, logger="dicomops"):
        outcome = watch.handle_study(study, pacs, staging, work, CONFIG.ingest, KEY, champion, cache)
    assert failed_on == [mapper.uid(first)]  # its segmenter's SR had been built: it is not sent without its SEG
    code = "segmenter_failed:ValueError"
    assert (outcome.status, outcome.accepted_series, outcome.series_failed, outcome.failed_series) == \
        ("ingested", 2, 1, f"{mapper.uid(first)}:{code}"), outcome
    assert outcome.reason.startswith(f"1 of its 2 series answered without the segmenter's results: {code} (1), "
                                     "their classifier's SR went back; not answered again unless its images change")
    assert by_kind(pacs.stored) == {("SR", TINY.model_name): {first, second}, ("SR", SEGMENTER): {second},
                                    ("SEG", SEGMENTER): {second}}
    assert outcome.results_stored == len(pacs.stored) == 4
    # The ledger, the pass's counts and the de-identified results table say it; the SRs' series stay scored.
    (row,) = pd.read_csv(WorkLayout(work).pacs.ledger, keep_default_na=False).to_dict("records")
    assert (row["status"], row["series_failed"], row["failed_series"]) == \
        ("ingested", 1, f"{mapper.uid(first)}:{code}")
    summary = watch.summarise([outcome])
    assert (summary["ingested"], summary["partly_scored"], summary["series_failed"], summary["results_stored"]) == \
        (1, 1, 1, 4)
    results = pd.read_csv(WorkLayout(WorkLayout(work).pacs.root).predictions(outcome.token) / "results.csv",
                          keep_default_na=False, dtype={"segmenter_version": str}).set_index("series")
    assert len(results) == 2 and set(results.status) == {"scored"}
    assert results.loc[mapper.uid(first)].segmenter == "" and \
        results.loc[mapper.uid(first)].reason == f"the segmenter's results not written back: {code}"
    assert results.loc[mapper.uid(second)].segmenter == SEGMENTER and results.loc[mapper.uid(second)].reason == ""
    # A warm answer would say nothing of the failure: the study keeps no manifest (its volumes are kept).
    assert cache.manifests == {} and len(cache.volumes) == 2
    # Seen again as it is: handled, not answered again.
    again = watch.handle_study(study, pacs, staging, work, CONFIG.ingest, KEY, champion, cache)
    assert again.status == "duplicate" and len(pacs.stored) == 4
    # The message quoted header values: neither the record nor the logs hold one.
    _assert_watch_leaked_nothing(files, work, caplog.text, outcome)
    assert f"the segmenter failed on series {mapper.uid(first)} (segmenter_failed:ValueError" in caplog.text
    assert list(staging.glob("*")) == []


def test_predict_pacs_and_the_online_service_answer_it_partly_with_the_failure_listed(
        exported_champion: ExportedChampion, champion: Champion, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from dicomops.serving.online import Service, ServiceOptions

    files, (first, second) = two_series_study(tmp_path, index=93)
    mapper = KeyedMapper(KEY)
    failing_on(monkeypatch, mapper.uid(second), RuntimeError(phi_message(files)))
    code = "segmenter_failed:RuntimeError"
    pacs, cache = FolderPacs(files), Cache()
    answered: list[Answer] = []
    with caplog.at_level(logging.INFO, logger="dicomops"):
        answer = answer_pacs_study(study_uid_of(files), pacs, tmp_path / "staging", tmp_path / "scratch",
                                   CONFIG.ingest, KEY, champion, cache, write_back=True, answered=answered.append)
    assert (answer.status, answer.reason) == ("scored", "")
    assert [f.series for f in answer.findings] == sorted([mapper.uid(first), mapper.uid(second)])
    assert [(f.series, f.reason, f.by_segmenter) for f in answer.failed_series] == [(mapper.uid(second), code, True)]
    assert [s.series for s in answer.localised] == [mapper.uid(first)]
    assert by_kind(pacs.stored) == {("SR", TINY.model_name): {first, second}, ("SR", SEGMENTER): {first},
                                    ("SEG", SEGMENTER): {first}}
    assert answer.results_stored == 4 and answered == [answer] and cache.manifests == {}
    assert not watch.record_answered(tmp_path / "work", answer, "a batch")  # partly answered: left to the watch
    needles = _needles(files)
    assert not [n for n in needles if n in repr(answer.as_dict())] and not [n for n in needles if n in caplog.text]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DICOMOPS_MLFLOW_ARTIFACT_ROOT", str(exported_champion.artifacts))
        for name in ("DICOMOPS_REDIS_URL", "DICOMOPS_PACS_PASSWORD"):
            mp.delenv(name, raising=False)
        online = tmp_path / "online"
        service = Service(ServiceOptions(model_name=TINY.model_name, alias="champion", version=None, engine="ort-fp32",
                                         threads=1, work=online, staging=online / "staging", ingest=CONFIG.ingest,
                                         key=KEY, tracking_uri=exported_champion.uri, pacs_url=None, cache_ttl_s=60,
                                         use_cache=False))
    one = copy.copy(service)
    one.champion, one.pacs = champion, FolderPacs(files)
    said = one.answer_study({"study_instance_uid": study_uid_of(files), "write_back": True}, champion.engine)
    assert (said["status"], said["accepted_series"], said["results_stored"]) == ("partly_scored", 2, 4)
    assert sorted(s["series_instance_uid"] for s in said["series"]) == sorted([first, second])
    assert said["failed_series"] == [{"series_instance_uid": second, "reason": code}]
    assert said["warning"] == (f"the segmenter failed on 1 of its 2 series ({code} (1)): failed_series names them; "
                               "their classifier's SR was written back, none of the segmenter's objects")
    assert watch.study_token(KEY, study_uid_of(files)) not in watch.handled_tokens(online)
    assert scan_for_phi(online, needles) == []


def test_a_full_disk_in_the_segmenter_s_part_still_stops_the_study_as_an_outage(
        champion: Champion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not the series' doing: failed alone, every series behind it would fail the same way."""
    files, (first, _) = two_series_study(tmp_path, index=95)
    failing_on(monkeypatch, KeyedMapper(KEY).uid(first), OSError(errno.ENOSPC, "No space left on device"))
    pacs, work = FolderPacs(files), tmp_path / "work"
    with pytest.raises(OSError, match="No space left"):
        watch.handle_study(study_uid_of(files), pacs, tmp_path / "staging", work, CONFIG.ingest, KEY, champion)
    assert watch.handled_tokens(work) == set() and pacs.stored == []
    with pytest.raises(OSError, match="No space left"):
        answer_pacs_study(study_uid_of(files), pacs, tmp_path / "staging", tmp_path / "scratch", CONFIG.ingest, KEY,
                          champion, write_back=True)
    assert pacs.stored == []


def test_a_segmenter_failure_is_said_apart_from_a_series_not_scored(tmp_path: Path) -> None:
    """The result table keeps the classifier's row of the series, with the segmenter's code as its
    reason; a series not scored still has a failed row. Neither is the watch's ``answered`` row."""
    from types import SimpleNamespace

    from dicomops.serving.predict import by_step, result_table, segmenter_failure_code

    assert segmenter_failure_code(ValueError("Doe^Jane 1.2.3")) == "segmenter_failed:ValueError"
    failures = [SeriesFailure("2.25.2", "GE", "unreadable_pixels"),
                SeriesFailure("2.25.1", "GE", "segmenter_failed:ValueError")]
    assert [[f.series for f in step] for step in by_step(failures)] == [["2.25.2"], [], ["2.25.1"]]
    answer = Answer("tok", "scored", [SeriesFinding("2.25.1", "GE", 4, 0.9, True, 1, "off")], 2, results_stored=1,
                    failed_series=failures)
    champion = SimpleNamespace(threshold=0.5, name="classifier", version="7",
                               engine=SimpleNamespace(choice=SimpleNamespace(kind="onnxruntime")))
    table = result_table([answer], champion).set_index("series")  # type: ignore[arg-type]
    assert table.status.to_dict() == {"2.25.1": "scored", "2.25.2": "failed"}
    assert table.reason.to_dict() == {"2.25.1": "the segmenter's results not written back: segmenter_failed:ValueError",
                                      "2.25.2": "series not scored: unreadable_pixels"}
    only_segmenter = Answer("tok", "scored", answer.findings, 1, results_stored=1, failed_series=failures[1:])
    assert not watch.record_answered(tmp_path, only_segmenter, "a batch")
    assert not WorkLayout(tmp_path).pacs.ledger.exists()


# --------------------------------------------------------------------------------------------------
# The classifier's own SR failing on one series (until 2026-12-07 the whole study failed, nothing went
# back): that series alone fails, nothing goes back for it (the segmenter is not run on it), the others
# are answered, and it is named ``report_failed:<type>`` where the segmenter's failures are.
# --------------------------------------------------------------------------------------------------
def report_failing_on(monkeypatch: pytest.MonkeyPatch, targets: set[str],
                      error: BaseException) -> list[tuple[str, int]]:
    """The classifier's SR (series number 9001) of the series of original UIDs `targets` raises
    `error`, as highdicom refusing a header value would; every other SR is built as it is. Patched
    where :func:`dicomops.pacs.watch.build_reports` imports it from. Returns every call made, as
    (original series UID, series number)."""
    import dicomops.pacs.results as results

    real = results.structured_report
    calls: list[tuple[str, int]] = []

    def flaky(source_images: Any, finding: Any, *, series_number: int = 9001, instance_number: int = 1) -> Any:
        series = str(source_images[0].SeriesInstanceUID)
        calls.append((series, series_number))
        if series in targets and series_number == 9001:
            raise error
        return real(source_images, finding, series_number=series_number, instance_number=instance_number)

    monkeypatch.setattr(results, "structured_report", flaky)
    return calls


def online_service(exported_champion: ExportedChampion, champion: Champion, files: list[Path], online: Path) -> Any:
    """The online service on `champion`, its PACS the study's files."""
    from dicomops.serving.online import Service, ServiceOptions

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DICOMOPS_MLFLOW_ARTIFACT_ROOT", str(exported_champion.artifacts))
        for name in ("DICOMOPS_REDIS_URL", "DICOMOPS_PACS_PASSWORD"):
            mp.delenv(name, raising=False)
        service = Service(ServiceOptions(model_name=TINY.model_name, alias="champion", version=None, engine="ort-fp32",
                                         threads=1, work=online, staging=online / "staging", ingest=CONFIG.ingest,
                                         key=KEY, tracking_uri=exported_champion.uri, pacs_url=None, cache_ttl_s=60,
                                         use_cache=False))
    one = copy.copy(service)
    one.champion, one.pacs = champion, FolderPacs(files)
    return one


def test_the_watch_answers_the_other_series_when_one_series_classifier_sr_cannot_be_written(
        champion: Champion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    files, (first, second) = two_series_study(tmp_path, index=97)
    mapper = KeyedMapper(KEY)
    calls = report_failing_on(monkeypatch, {first}, ValueError(phi_message(files)))
    pacs, work, staging, cache = FolderPacs(files), tmp_path / "work", tmp_path / "staging", Cache()
    study = study_uid_of(files)
    with caplog.at_level(logging.INFO, logger="dicomops"):
        outcome = watch.handle_study(study, pacs, staging, work, CONFIG.ingest, KEY, champion, cache)
    code = "report_failed:ValueError"
    assert (outcome.status, outcome.accepted_series, outcome.series_failed, outcome.failed_series) == \
        ("ingested", 2, 1, f"{mapper.uid(first)}:{code}"), outcome
    assert outcome.reason.startswith(f"1 of its 2 series scored and not answered, their classifier's SR could not be "
                                     f"written: {code} (1), nothing went back for them; not answered again unless")
    assert "not scored" not in outcome.reason and "once the report writer is fixed" in outcome.reason
    # Nothing for the failed series, not even the segmenter's objects (it was not run on it); all of the other's.
    assert by_kind(pacs.stored) == {("SR", TINY.model_name): {second}, ("SR", SEGMENTER): {second},
                                    ("SEG", SEGMENTER): {second}}
    assert outcome.results_stored == len(pacs.stored) == 3
    assert (first, 9001) in calls and (first, watch.SEGMENTER_SR_SERIES) not in calls
    (row,) = pd.read_csv(WorkLayout(work).pacs.ledger, keep_default_na=False).to_dict("records")
    assert (row["status"], row["series_failed"], row["failed_series"]) == ("ingested", 1, f"{mapper.uid(first)}:{code}")
    summary = watch.summarise([outcome])
    assert (summary["ingested"], summary["partly_scored"], summary["series_failed"], summary["results_stored"]) == \
        (1, 1, 1, 3)
    # Its row keeps the score and does not claim a result: failed, so no reader's review can meet it.
    results = pd.read_csv(WorkLayout(WorkLayout(work).pacs.root).predictions(outcome.token) / "results.csv",
                          keep_default_na=False, dtype={"segmenter_version": str}).set_index("series")
    assert len(results) == 2 and results.status.to_dict() == {mapper.uid(first): "failed", mapper.uid(second): "scored"}
    assert results.loc[mapper.uid(first)].reason == f"scored, no result written back: {code}"
    assert 0.0 <= float(results.loc[mapper.uid(first)].score) <= 1.0 and results.loc[mapper.uid(first)].segmenter == ""
    assert results.loc[mapper.uid(second)].segmenter == SEGMENTER
    assert cache.manifests == {} and len(cache.volumes) == 2
    again = watch.handle_study(study, pacs, staging, work, CONFIG.ingest, KEY, champion, cache)
    assert again.status == "duplicate" and len(pacs.stored) == 3
    _assert_watch_leaked_nothing(files, work, caplog.text, outcome)
    assert f"the classifier's SR of series {mapper.uid(first)} could not be written ({code};" in caplog.text
    assert list(staging.glob("*")) == []


def test_predict_pacs_and_the_online_service_answer_the_other_series_when_one_sr_cannot_be_written(
        exported_champion: ExportedChampion, champion: Champion, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    files, (first, second) = two_series_study(tmp_path, index=99)
    mapper = KeyedMapper(KEY)
    report_failing_on(monkeypatch, {second}, TypeError(phi_message(files)))
    code = "report_failed:TypeError"
    pacs, cache = FolderPacs(files), Cache()
    answered: list[Answer] = []
    with caplog.at_level(logging.INFO, logger="dicomops"):
        answer = answer_pacs_study(study_uid_of(files), pacs, tmp_path / "staging", tmp_path / "scratch",
                                   CONFIG.ingest, KEY, champion, cache, write_back=True, answered=answered.append)
    assert (answer.status, answer.reason) == ("scored", "")
    assert [(f.series, f.reason, f.by_report, f.by_segmenter) for f in answer.failed_series] == \
        [(mapper.uid(second), code, True, False)]
    assert [s.series for s in answer.localised] == [mapper.uid(first)]
    assert by_kind(pacs.stored) == {("SR", TINY.model_name): {first}, ("SR", SEGMENTER): {first},
                                    ("SEG", SEGMENTER): {first}}
    assert answer.results_stored == 3 and answered == [answer] and cache.manifests == {}
    assert not watch.record_answered(tmp_path / "work", answer, "a batch")
    needles = _needles(files)
    assert not [n for n in needles if n in repr(answer.as_dict())] and not [n for n in needles if n in caplog.text]

    online = tmp_path / "online"
    with caplog.at_level(logging.INFO, logger="dicomops"):
        said = online_service(exported_champion, champion, files, online).answer_study(
            {"study_instance_uid": study_uid_of(files), "write_back": True}, champion.engine)
    assert (said["status"], said["accepted_series"], said["results_stored"]) == ("partly_scored", 2, 3)
    assert sorted(s["series_instance_uid"] for s in said["series"]) == sorted([first, second])  # both scored
    assert said["failed_series"] == [{"series_instance_uid": second, "reason": code}]
    assert said["warning"] == (f"the classifier's SR could not be written for 1 of its 2 series ({code} (1)): "
                               "failed_series names them; they were scored, and nothing was written back for them")
    assert "could not be scored" not in said["warning"]
    assert watch.study_token(KEY, study_uid_of(files)) not in watch.handled_tokens(online)
    assert scan_for_phi(online, needles) == [] and not [n for n in needles if n in caplog.text]


def test_a_study_none_of_whose_srs_can_be_written_still_fails_with_nothing_stored(
        exported_champion: ExportedChampion, champion: Champion, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from dicomops.serving.online import RequestError

    files, (first, second) = two_series_study(tmp_path, index=101)
    mapper = KeyedMapper(KEY)
    calls = report_failing_on(monkeypatch, {first, second}, ValueError(phi_message(files)))
    code = "report_failed:ValueError"
    pacs, work, cache = FolderPacs(files), tmp_path / "work", Cache()
    with caplog.at_level(logging.INFO, logger="dicomops"):
        outcome = watch.handle_study(study_uid_of(files), pacs, tmp_path / "staging", work, CONFIG.ingest, KEY,
                                     champion, cache)
    assert (outcome.status, outcome.results_stored, outcome.series_failed) == ("failed", 0, 2), outcome
    assert outcome.reason.startswith(f"no report could be written: {code} (2); not answered")
    assert sorted(outcome.failed_series.split(";")) == sorted(f"{mapper.uid(s)}:{code}" for s in (first, second))
    assert pacs.stored == [] and cache.manifests == {} and watch.handled_tokens(work) == {outcome.token}
    assert {n for _, n in calls} == {9001}  # the segmenter was run on neither
    (row,) = pd.read_csv(WorkLayout(work).pacs.ledger, keep_default_na=False).to_dict("records")
    assert row["status"] == "failed"

    answered: list[Answer] = []
    answer = answer_pacs_study(study_uid_of(files), pacs, tmp_path / "staging", tmp_path / "scratch", CONFIG.ingest,
                               KEY, champion, cache, write_back=True, answered=answered.append)
    assert (answer.status, answer.results_stored, answered) == ("failed", 0, [])
    assert answer.reason == f"no report could be written: {code} (2); nothing stored"
    assert pacs.stored == [] and cache.manifests == {}
    with caplog.at_level(logging.INFO, logger="dicomops"), pytest.raises(RequestError) as refused:
        online_service(exported_champion, champion, files, tmp_path / "online").answer_study(
            {"study_instance_uid": study_uid_of(files), "write_back": True}, champion.engine)
    assert refused.value.status == 422 and "no report could be written" in str(refused.value)
    needles = _needles(files)
    assert scan_for_phi(work, needles) == [] and not [n for n in needles if n in caplog.text]
    assert not [n for n in needles if n in repr(outcome) + repr(answer.as_dict()) + str(refused.value)]


def test_a_full_disk_while_a_series_sr_is_written_still_stops_the_study_as_an_outage(
        champion: Champion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files, (first, _) = two_series_study(tmp_path, index=103)
    report_failing_on(monkeypatch, {first}, OSError(errno.ENOSPC, "No space left on device"))
    pacs, work = FolderPacs(files), tmp_path / "work"
    with pytest.raises(OSError, match="No space left"):
        watch.handle_study(study_uid_of(files), pacs, tmp_path / "staging", work, CONFIG.ingest, KEY, champion)
    assert watch.handled_tokens(work) == set() and pacs.stored == []
    with pytest.raises(OSError, match="No space left"):
        answer_pacs_study(study_uid_of(files), pacs, tmp_path / "staging", tmp_path / "scratch", CONFIG.ingest, KEY,
                          champion, write_back=True)
    assert pacs.stored == []
