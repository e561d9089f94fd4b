"""A study with one series that cannot be scored, sent to a real Orthanc: the whole study failed and
nothing went back for its good series (until 2026-12-06). Now pacs-watch stores the good series'
SR under the original study and nothing for the other, the ledger and the pass's MLflow run name the
failed series by its pseudonym with its reason code and count it, the study is not answered again on
the next pass, and the online service answers the same study with the failed series listed; a study
none of whose series can be scored is failed with nothing stored. Nothing identifying reaches the
work directory, the ledger, MLflow, Prefect or the logs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
import pytest

import mlflow
from dicomops.deid import scan_for_phi
from dicomops.deid.keys import KeyedMapper, key_from_settings
from dicomops.pacs.orthanc import OrthancProcess
from dicomops.pacs.watch import study_token
from dicomops.serving.online import RequestError, Service, ServiceOptions
from flows.pacs_watch import pacs_watch
from tests.champion_fixture import CONFIG, TINY, ExportedChampion
from tests.flows.test_ingest_flow import _prefect_database
from tests.unit.test_partial_study import evidence_series, partial_study
from tests.unit.test_real_files import _needles

from .orthanc_fixture import orthanc  # noqa: F401  (a fixture)
from .test_pacs_watch import _pacs_env, _reports, _send, _wait_stable

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def test_a_series_that_cannot_be_scored_fails_alone_once_and_leaks_nothing(
        orthanc: OrthancProcess, exported_champion: ExportedChampion, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from tests.conftest import PREFECT_HOME

    champion = exported_champion.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion)
    monkeypatch.setenv("DICOMOPS_MLFLOW_ARTIFACT_ROOT", str(exported_champion.artifacts))
    monkeypatch.delenv("DICOMOPS_REDIS_URL", raising=False)
    _pacs_env(monkeypatch, orthanc)
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
