"""A study with one series that cannot be scored, sent to a real Orthanc: the whole study failed and
nothing went back for its good series (until 2026-12-06). Now pacs-watch stores the good series'
SR under the original study and nothing for the other, the ledger and the pass's MLflow run name the
failed series by its pseudonym with its reason code and count it, the study is not answered again on
the next pass, and the online service answers the same study with the failed series listed; a study
none of whose series can be scored is failed with nothing stored. Nothing identifying reaches the
work directory, the ledger, MLflow, Prefect or the logs.

The same for a series the segmenter fails on (until 2026-12-07 the whole study failed and nothing
went back, not even the classifier's SRs): its classifier's SR goes back and none of the
segmenter's objects, the other series gets all three, and the study is recorded as partly answered
with the code ``segmenter_failed:<type>`` where a failed series is recorded."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
import pytest

import mlflow
from dicomops.deid import scan_for_phi
from dicomops.deid.keys import KeyedMapper, key_from_settings
from dicomops.layout import WorkLayout
from dicomops.pacs.changes import ChangesFeed, Cursor
from dicomops.pacs.orthanc import OrthancProcess
from dicomops.pacs.watch import study_token
from dicomops.serving.online import RequestError, Service, ServiceOptions
from flows.pacs_watch import pacs_watch
from tests.champion_fixture import CONFIG, PRE, TINY, ExportedChampion
from tests.flows.test_ingest_flow import _prefect_database
from tests.segmenter_fixture import register_density_segmenter
from tests.unit.test_partial_study import evidence_series, partial_study
from tests.unit.test_real_files import _needles
from tests.unit.test_segmenter_failure import by_kind, failing_on, phi_message, two_series_study

from .orthanc_fixture import orthanc  # noqa: F401  (a fixture)
from .test_pacs_watch import _objects, _pacs_env, _reports, _send, _wait_stable

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def _watch_env(monkeypatch: pytest.MonkeyPatch, pacs: OrthancProcess, exported_champion: ExportedChampion) -> None:
    """The watch's settings: the champion's registry, no Redis cache, the PACS's address and credentials."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", exported_champion.uri)
    monkeypatch.setenv("DICOMOPS_MLFLOW_ARTIFACT_ROOT", str(exported_champion.artifacts))
    monkeypatch.delenv("DICOMOPS_REDIS_URL", raising=False)
    _pacs_env(monkeypatch, pacs)


def test_a_series_that_cannot_be_scored_fails_alone_once_and_leaks_nothing(
        orthanc: OrthancProcess, exported_champion: ExportedChampion, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from tests.conftest import PREFECT_HOME

    champion = exported_champion.uri
    _watch_env(monkeypatch, orthanc, exported_champion)
    key, work, staging = key_from_settings(), tmp_path / "work", tmp_path / "staging"
    mapper = KeyedMapper(key)
    part_files, good, (bad,) = partial_study(tmp_path / "part", index=71)
    none_files, _, (bad_alone,) = partial_study(tmp_path / "none", index=73, good=False)
    study_part, study_none = _send(orthanc, part_files), _send(orthanc, none_files)
    _wait_stable(orthanc, {study_part, study_none})

    since_ms = int(time.time() * 1000)
    caplog.set_level(logging.INFO, logger="dicomops")
    result = pacs_watch(work=work, staging=staging, config=CONFIG)
    assert (result["ingested"], result["failed"], result["results_stored"]) == (1, 1, 1), result
    assert (result["partly_scored"], result["series_failed"]) == (1, 2)

    ledger = pd.read_csv(work / "pacs/studies.csv", keep_default_na=False).set_index("token")
    part, none = ledger.loc[study_token(key, study_part)], ledger.loc[study_token(key, study_none)]
    assert (part.status, part.accepted_series, part.results_stored, part.series_failed) == ("ingested", 2, 1, 1)
    assert part.failed_series == f"{mapper.uid(bad)}:unreadable_pixels"
    assert part.reason.startswith("1 of its 2 series not scored: unreadable_pixels (1), the others answered; not "
                                  "answered again unless its images change")
    assert (none.status, none.results_stored, none.series_failed) == ("failed", 0, 1)
    assert none.failed_series == f"{mapper.uid(bad_alone)}:unreadable_pixels"
    assert none.reason == "none of its series could be scored: unreadable_pixels (1); not answered"

    # In the PACS: the good series' SR under the original study, nothing for the failed series or study.
    (report,) = _reports(orthanc, study_part)
    assert report.StudyInstanceUID == study_part and evidence_series(report) == {good}
    assert _reports(orthanc, study_none) == []

    # The pass's run counts the failed series and its studies.csv names them.
    tracking = mlflow.tracking.MlflowClient(champion)
    experiment = tracking.get_experiment_by_name("dicomops-inference").experiment_id
    passes = f"tags.`dicomops.source` = 'pacs-watch' and attributes.start_time >= {since_ms}"
    (run,) = tracking.search_runs([experiment], passes)
    assert {k: run.data.metrics[k] for k in ("studies_ingested", "studies_failed", "studies_partly_scored",
                                             "series_failed", "results_stored")} == {
        "studies_ingested": 1.0, "studies_failed": 1.0, "studies_partly_scored": 1.0, "series_failed": 2.0,
        "results_stored": 1.0}
    logged = pd.read_csv(tracking.download_artifacts(run.info.run_id, "studies.csv", str(tmp_path)),
                         keep_default_na=False).set_index("token")
    assert logged.failed_series.to_dict() == ledger.failed_series.to_dict()

    # Its SR stored makes the study stable again: seen, not answered again.
    _wait_stable(orthanc, {study_part})
    time.sleep(2.5)
    again = pacs_watch(work=work, staging=staging, config=CONFIG)
    assert (again["ingested"], again["failed"], again["series_failed"], again["results_stored"]) == (0, 0, 0, 0)
    assert len(_reports(orthanc, study_part)) == 1

    # The online service answers the same study with the failed series listed, by the UIDs its caller knows.
    online = tmp_path / "online"
    service = Service(ServiceOptions(model_name=TINY.model_name, alias="champion", version=None, engine="ort-fp32",
                                     threads=1, work=online, staging=online / "staging", ingest=CONFIG.ingest,
                                     key=key, tracking_uri=champion, pacs_url=orthanc.url, cache_ttl_s=60,
                                     use_cache=False))
    answer = service.answer_study({"study_instance_uid": study_part, "write_back": True}, service.champion.engine)
    assert (answer["status"], answer["accepted_series"], answer["results_stored"]) == ("partly_scored", 2, 1)
    assert [s["series_instance_uid"] for s in answer["series"]] == [good]
    assert answer["failed_series"] == [{"series_instance_uid": bad, "reason": "unreadable_pixels"}]
    assert "1 of its 2 series could not be scored (unreadable_pixels (1))" in answer["warning"]
    assert len(_reports(orthanc, study_part)) == 1  # the same SR, the same UIDs: one copy
    assert "answered" not in set(pd.read_csv(work / "pacs/studies.csv", keep_default_na=False).status)
    with pytest.raises(RequestError) as refused:
        service.answer_study({"study_instance_uid": study_none, "write_back": True}, service.champion.engine)
    assert refused.value.status == 422 and "none of its series could be scored" in refused.value.message
    assert refused.value.extra == {"failed_series": [{"series_instance_uid": bad_alone, "reason": "unreadable_pixels"}]}
    assert _reports(orthanc, study_none) == []

    needles = _needles([*part_files, *none_files])
    assert {study_part, study_none, good, bad, bad_alone} <= needles
    for place in (work, online, Path(champion.removeprefix("sqlite:///")).parent, PREFECT_HOME, _prefect_database()):
        hits = scan_for_phi(place, needles)
        assert hits == [], f"PHI found under {place}: {hits[:5]}"
    assert len(scan_for_phi(tmp_path / "part", needles)) > 5  # not vacuous
    assert "series not scored" in caplog.text and not [n for n in needles if n in caplog.text]
    assert list(staging.glob("*")) == [] and list((online / "staging").glob("*")) == []


SEGMENTER = "partial-segmenter"
SEG_CONFIG = CONFIG.model_copy(update={"segment": CONFIG.segment.model_copy(update={"model_name": SEGMENTER})})


def test_a_series_the_segmenter_fails_on_goes_back_with_its_classifier_sr_once_and_leaks_nothing(
        orthanc: OrthancProcess, exported_champion: ExportedChampion, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from tests.conftest import PREFECT_HOME

    champion = exported_champion.uri
    register_density_segmenter(champion, SEGMENTER, PRE)
    _watch_env(monkeypatch, orthanc, exported_champion)
    key, work, staging = key_from_settings(), tmp_path / "work", tmp_path / "staging"
    mapper = KeyedMapper(key)
    with ChangesFeed(orthanc.url, orthanc.credentials) as feed:  # the studies of the module's other tests: not these
        Cursor(WorkLayout(work).pacs.cursor).advance(feed.last())
    files, (first, second) = two_series_study(tmp_path / "seg", index=97)
    study = _send(orthanc, files)
    _wait_stable(orthanc, {study})
    failing_on(monkeypatch, mapper.uid(first), ValueError(phi_message(files)))
    code = "segmenter_failed:ValueError"

    since_ms = int(time.time() * 1000)
    caplog.set_level(logging.INFO, logger="dicomops")
    result = pacs_watch(work=work, staging=staging, config=SEG_CONFIG)
    assert (result["ingested"], result["failed"], result["results_stored"]) == (1, 0, 4), result
    assert (result["partly_scored"], result["series_failed"]) == (1, 1)

    (row,) = pd.read_csv(work / "pacs/studies.csv", keep_default_na=False).itertuples()
    assert (row.token, row.status, row.accepted_series, row.results_stored, row.series_failed) == \
        (study_token(key, study), "ingested", 2, 4, 1)
    assert row.failed_series == f"{mapper.uid(first)}:{code}"
    assert row.reason.startswith(f"1 of its 2 series answered without the segmenter's results: {code} (1), their "
                                 "classifier's SR went back; not answered again unless its images change")

    # In the PACS: both classifier SRs, the segmenter's SR and SEG for the other series only.
    held = [*_objects(orthanc, study, "SR"), *_objects(orthanc, study, "SEG")]
    assert by_kind(held) == {("SR", TINY.model_name): {first, second}, ("SR", SEGMENTER): {second},
                             ("SEG", SEGMENTER): {second}}
    assert all(ds.StudyInstanceUID == study for ds in held)

    # The pass's run counts the failed series and its studies.csv names it.
    tracking = mlflow.tracking.MlflowClient(champion)
    experiment = tracking.get_experiment_by_name("dicomops-inference").experiment_id
    passes = f"tags.`dicomops.source` = 'pacs-watch' and attributes.start_time >= {since_ms}"
    (run,) = tracking.search_runs([experiment], passes)
    assert {k: run.data.metrics[k] for k in ("studies_ingested", "studies_partly_scored", "series_failed",
                                             "results_stored")} == {
        "studies_ingested": 1.0, "studies_partly_scored": 1.0, "series_failed": 1.0, "results_stored": 4.0}
    logged = pd.read_csv(tracking.download_artifacts(run.info.run_id, "studies.csv", str(tmp_path)),
                         keep_default_na=False)
    assert list(logged.failed_series) == [f"{mapper.uid(first)}:{code}"]

    # Its results stored make the study stable again: seen, not answered again.
    _wait_stable(orthanc, {study})
    time.sleep(2.5)
    again = pacs_watch(work=work, staging=staging, config=SEG_CONFIG)
    assert (again["ingested"], again["failed"], again["series_failed"], again["results_stored"]) == (0, 0, 0, 0)
    assert len(_objects(orthanc, study, "SR")) == 3

    # The online service answers it partly, the series the segmenter failed on listed by its original UID.
    online = tmp_path / "online"
    service = Service(ServiceOptions(model_name=TINY.model_name, alias="champion", version=None, engine="ort-fp32",
                                     threads=1, work=online, staging=online / "staging", ingest=CONFIG.ingest,
                                     key=key, tracking_uri=champion, pacs_url=orthanc.url, cache_ttl_s=60,
                                     segmenter_name=SEGMENTER, use_cache=False))
    answer = service.answer_study({"study_instance_uid": study, "write_back": True}, service.champion.engine)
    assert (answer["status"], answer["accepted_series"], answer["results_stored"]) == ("partly_scored", 2, 4)
    assert sorted(s["series_instance_uid"] for s in answer["series"]) == sorted([first, second])
    assert answer["failed_series"] == [{"series_instance_uid": first, "reason": code}]
    assert answer["warning"].startswith(f"the segmenter failed on 1 of its 2 series ({code} (1))")
    held = [*_objects(orthanc, study, "SR"), *_objects(orthanc, study, "SEG")]
    assert len(held) == 4  # the same objects, the same UIDs: one copy
    assert "answered" not in set(pd.read_csv(work / "pacs/studies.csv", keep_default_na=False).status)

    needles = _needles(files)
    assert {study, first, second} <= needles and [n for n in needles if n in phi_message(files)]
    for place in (work, online, Path(champion.removeprefix("sqlite:///")).parent, PREFECT_HOME, _prefect_database()):
        hits = scan_for_phi(place, needles)
        assert hits == [], f"PHI found under {place}: {hits[:5]}"
    assert len(scan_for_phi(tmp_path / "seg", needles)) > 5  # not vacuous
    assert f"the segmenter failed on series {mapper.uid(first)} ({code}" in caplog.text
    assert not [n for n in needles if n in caplog.text]
    assert list(staging.glob("*")) == [] and list((online / "staging").glob("*")) == []
