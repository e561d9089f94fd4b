"""A scored series whose classifier's SR cannot be written, through a real Orthanc (until 2026-12-06
the whole study failed and nothing went back). The series is one a site would send: its images
declare their Specific Character Set by a codec's name (``windows-1252``: no term PS3.3 defines,
and it names none) over an operator's name that is not ASCII. The ingest gate accepts it (pydicom
reads it with that codec), Orthanc keeps it as sent, and the SR writer refuses it, for that series
alone (:func:`dicomops.pacs.results._source_character_set`: how its text is written is not
certain). Nothing is patched: the other series of the same study is answered.

* pacs-watch stores the other series' classifier SR, segmenter SR and SEG under the original
  study and nothing for the refused series (the segmenter is not run on it); the ledger and the
  pass's MLflow run name it ``<pseudonym>:report_failed:ValueError``; it is not answered again; the
  online service answers it the same way, and the PACS holds one copy of each object.
* A study none of whose SRs can be written is ``failed`` with nothing stored, by the watch and by
  ``dicomops predict --pacs``, and the reason says so.
* The PACS killed while it stores a study's results (after keeping them, before its answer
  arrives): an outage, the study recorded nowhere and tried again on the next pass; once the PACS is
  back, the retry stores the same objects under the same UIDs, so it holds one copy of each.

Nothing identifying reaches the work directory, the ledger, MLflow, Prefect or the logs."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from pydantic import SecretStr

import mlflow
from dicomops import io
from dicomops.deid import scan_for_phi
from dicomops.deid.keys import KeyedMapper, key_from_settings
from dicomops.layout import WorkLayout
from dicomops.pacs.changes import ChangesFeed, Cursor
from dicomops.pacs.client import URL_ENV, PacsClient, PacsError
from dicomops.pacs.orthanc import OrthancProcess, start_orthanc
from dicomops.pacs.watch import study_token
from dicomops.serving.online import Service, ServiceOptions
from flows.pacs_watch import pacs_watch
from flows.predict import predict
from tests.champion_fixture import CONFIG, PRE, TINY, ExportedChampion
from tests.flows.test_ingest_flow import _prefect_database
from tests.segmenter_fixture import register_density_segmenter
from tests.unit.test_real_files import _needles
from tests.unit.test_report_refused_series import CODE, OPERATOR, refusing_study
from tests.unit.test_segmenter_failure import by_kind

from .conftest import free_port
from .orthanc_fixture import (  # noqa: F401  (orthanc is a fixture)
    STABLE_AGE_S,
    CuttingProxy,
    orthanc,
    pacs_credentials,
    require_orthanc,
)
from .test_pacs_watch import _objects, _pacs_env, _send, _wait_stable

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]

SEGMENTER = "report-failure-segmenter"
SEG_CONFIG = CONFIG.model_copy(update={"segment": CONFIG.segment.model_copy(update={"model_name": SEGMENTER})})


@pytest.fixture(scope="module")
def store(exported_champion: ExportedChampion) -> str:
    """The champion's store, with the density segmenter promoted beside the classifier."""
    register_density_segmenter(exported_champion.uri, SEGMENTER, PRE)
    return exported_champion.uri


def _watch_env(monkeypatch: pytest.MonkeyPatch, pacs: OrthancProcess, exported_champion: ExportedChampion) -> None:
    """The watch's settings: the champion's registry, no Redis cache, the PACS's address and credentials."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", exported_champion.uri)
    monkeypatch.setenv("DICOMOPS_MLFLOW_ARTIFACT_ROOT", str(exported_champion.artifacts))
    monkeypatch.delenv("DICOMOPS_REDIS_URL", raising=False)
    _pacs_env(monkeypatch, pacs)


def _from_now_on(server: OrthancProcess, work: Path) -> None:
    """The watch of `work` starts after what `server` holds now (the module's other tests' studies,
    once what they stored last has become stable: its change would come after the cursor)."""
    time.sleep(STABLE_AGE_S + 1.5)
    with ChangesFeed(server.url, server.credentials) as feed:
        Cursor(WorkLayout(work).pacs.cursor).advance(feed.last())


def _watched_study(server: OrthancProcess, exported_champion: ExportedChampion, monkeypatch: pytest.MonkeyPatch,
                   tmp_path: Path, *, index: int, refused: int) -> tuple[list[Path], list[str], str, set[str]]:
    """The watch of ``tmp_path / "work"`` set up from now on, then a study of two series, `refused` of
    them with an SR the writer refuses (:func:`refusing_study`), sent to the PACS and stable: its
    files, its two series' UIDs, its StudyInstanceUID and the instances the PACS holds under it."""
    _watch_env(monkeypatch, server, exported_champion)
    _from_now_on(server, tmp_path / "work")
    files, series = refusing_study(tmp_path / "send", index=index, refused=refused)
    study = _send(server, files)
    _wait_stable(server, {study})
    images, _ = _held(server, study)
    return files, list(series), study, images


def _held(server: OrthancProcess, study: str) -> tuple[set[str], dict[tuple[str, str], set[str]]]:
    """Every instance the PACS holds under `study` (SOP Instance UIDs, by QIDO-RS), and its SRs and
    SEGs by (modality, the model that made it): the original series each answers."""
    with PacsClient(server.dicomweb_url, server.credentials) as pacs:
        instances = pacs.instance_uids(study)
    results = [*_objects(server, study, "SR"), *_objects(server, study, "SEG")]
    assert all(str(ds.StudyInstanceUID) == study for ds in results)
    return instances, by_kind(results)


def _pass_runs(tracking_uri: str, since_ms: int) -> list[Any]:
    tracking = mlflow.tracking.MlflowClient(tracking_uri)
    experiment = tracking.get_experiment_by_name("dicomops-inference").experiment_id
    return tracking.search_runs([experiment], f"tags.`dicomops.source` = 'pacs-watch' and "
                                              f"attributes.start_time >= {since_ms}")


def _logged_failures(tracking_uri: str, run: Any, tmp: Path) -> list[str]:
    """The failed_series column of the pass's studies.csv."""
    table = mlflow.tracking.MlflowClient(tracking_uri).download_artifacts(run.info.run_id, "studies.csv", str(tmp))
    return list(pd.read_csv(table, keep_default_na=False).failed_series)


def _assert_nothing_identifying(files: list[Path], places: list[Path], logs: str, *said: str) -> None:
    """None of the study's identifying values (its original UIDs, the refused series' operator
    included) under `places`, in the logs or in what was `said`; the scan is checked not vacuous."""
    from tests.conftest import PREFECT_HOME

    needles = _needles(files)
    assert {OPERATOR, "Müller", "Jürgen"} <= needles
    assert len(scan_for_phi(files[0].parents[1], needles)) > 5  # not vacuous
    for place in (*places, PREFECT_HOME, _prefect_database()):
        hits = scan_for_phi(place, needles)
        assert hits == [], f"PHI found under {place}: {hits[:5]}"
    assert not [n for n in needles if n in logs]
    assert not [n for n in needles for text in said if n in text]


def test_a_series_whose_sr_the_writer_refuses_fails_alone_in_the_pacs_once_and_leaks_nothing(
        orthanc: OrthancProcess, exported_champion: ExportedChampion, store: str, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    key, work, staging = key_from_settings(), tmp_path / "work", tmp_path / "staging"
    mapper = KeyedMapper(key)
    files, (refused, other), study, images = _watched_study(orthanc, exported_champion, monkeypatch, tmp_path,
                                                            index=111, refused=1)
    assert len(images) == len(files) == 32

    since_ms = int(time.time() * 1000)
    caplog.set_level(logging.INFO, logger="dicomops")
    result = pacs_watch(work=work, staging=staging, config=SEG_CONFIG)
    assert (result["ingested"], result["failed"], result["results_stored"]) == (1, 0, 3), result
    assert (result["partly_scored"], result["series_failed"]) == (1, 1)

    (row,) = pd.read_csv(WorkLayout(work).pacs.ledger, keep_default_na=False).itertuples()
    assert (row.token, row.status, row.accepted_series, row.results_stored, row.series_failed) == \
        (study_token(key, study), "ingested", 2, 3, 1)
    assert row.failed_series == f"{mapper.uid(refused)}:{CODE}"
    assert row.reason.startswith(f"1 of its 2 series scored and not answered, their classifier's SR could not be "
                                 f"written: {CODE} (1), nothing went back for them; not answered again unless its "
                                 "images change")
    assert "not scored" not in row.reason and "once the report writer is fixed" in row.reason

    # In the PACS: the other series' three objects under the original study; nothing for the refused
    # one, not even the segmenter's (it was not run on it); the images as they were.
    held, kinds = _held(orthanc, study)
    assert kinds == {("SR", TINY.model_name): {other}, ("SR", SEGMENTER): {other}, ("SEG", SEGMENTER): {other}}
    assert images < held and len(held) == len(images) + 3
    # The de-identified results table keeps the refused series' score and claims no result for it.
    results = pd.read_csv(WorkLayout(WorkLayout(work).pacs.root).predictions(row.token) / "results.csv",
                          keep_default_na=False, dtype={"segmenter_version": str}).set_index("series")
    assert results.status.to_dict() == {mapper.uid(refused): "failed", mapper.uid(other): "scored"}
    assert results.loc[mapper.uid(refused)].reason == f"scored, no result written back: {CODE}"
    assert results.loc[mapper.uid(refused)].segmenter == "" and results.loc[mapper.uid(other)].segmenter == SEGMENTER

    # The pass's run counts the failed series and its studies.csv names it.
    (run,) = _pass_runs(store, since_ms)
    assert run.info.status == "FINISHED"
    assert {k: run.data.metrics[k] for k in ("studies_ingested", "studies_failed", "studies_partly_scored",
                                             "series_failed", "results_stored")} == {
        "studies_ingested": 1.0, "studies_failed": 0.0, "studies_partly_scored": 1.0, "series_failed": 1.0,
        "results_stored": 3.0}
    assert _logged_failures(store, run, tmp_path) == [f"{mapper.uid(refused)}:{CODE}"]

    # Its results stored make the study stable again: seen, not answered again.
    _wait_stable(orthanc, {study})
    time.sleep(2.5)
    again = pacs_watch(work=work, staging=staging, config=SEG_CONFIG)
    assert (again["ingested"], again["failed"], again["series_failed"], again["results_stored"]) == (0, 0, 0, 0)
    assert _held(orthanc, study) == (held, kinds)

    # The online service (the path of predict --pacs) answers it the same way, by the UIDs its caller
    # knows, and stores the same objects: one copy of each.
    online = tmp_path / "online"
    service = Service(ServiceOptions(model_name=TINY.model_name, alias="champion", version=None, engine="ort-fp32",
                                     threads=1, work=online, staging=online / "staging", ingest=CONFIG.ingest,
                                     key=key, tracking_uri=store, pacs_url=orthanc.url, cache_ttl_s=60,
                                     segmenter_name=SEGMENTER, use_cache=False))
    answer = service.answer_study({"study_instance_uid": study, "write_back": True}, service.champion.engine)
    assert (answer["status"], answer["accepted_series"], answer["results_stored"]) == ("partly_scored", 2, 3)
    assert sorted(s["series_instance_uid"] for s in answer["series"]) == sorted([refused, other])  # both scored
    assert answer["failed_series"] == [{"series_instance_uid": refused, "reason": CODE}]
    assert answer["warning"].startswith(f"the classifier's SR could not be written for 1 of its 2 series ({CODE} (1))")
    assert _held(orthanc, study) == (held, kinds)
    assert "answered" not in set(pd.read_csv(WorkLayout(work).pacs.ledger, keep_default_na=False).status)

    assert f"the classifier's SR of series {mapper.uid(refused)} could not be written ({CODE};" in caplog.text
    _assert_nothing_identifying(files, [work, online, Path(store.removeprefix("sqlite:///")).parent], caplog.text,
                                str(result))  # (the online answer names the original UIDs: its caller's)
    assert list(staging.glob("*")) == [] and list((online / "staging").glob("*")) == []


def test_a_study_none_of_whose_srs_can_be_written_fails_with_nothing_in_the_pacs(
        orthanc: OrthancProcess, exported_champion: ExportedChampion, store: str, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    key, work, staging = key_from_settings(), tmp_path / "work", tmp_path / "staging"
    mapper = KeyedMapper(key)
    files, series, study, images = _watched_study(orthanc, exported_champion, monkeypatch, tmp_path,
                                                  index=113, refused=2)

    since_ms = int(time.time() * 1000)
    caplog.set_level(logging.INFO, logger="dicomops")
    result = pacs_watch(work=work, staging=staging, config=SEG_CONFIG)
    assert (result["ingested"], result["failed"], result["results_stored"], result["series_failed"]) == \
        (0, 1, 0, 2), result

    (row,) = pd.read_csv(WorkLayout(work).pacs.ledger, keep_default_na=False).itertuples()
    assert (row.token, row.status, row.accepted_series, row.results_stored, row.series_failed) == \
        (study_token(key, study), "failed", 2, 0, 2)
    assert sorted(row.failed_series.split(";")) == sorted(f"{mapper.uid(s)}:{CODE}" for s in series)
    assert row.reason == (f"no report could be written: {CODE} (2); not answered (the messages are withheld: they "
                          "may quote identifiers)")
    (run,) = _pass_runs(store, since_ms)
    assert {k: run.data.metrics[k] for k in ("studies_ingested", "studies_failed", "series_failed",
                                             "results_stored")} == {
        "studies_ingested": 0.0, "studies_failed": 1.0, "series_failed": 2.0, "results_stored": 0.0}
    assert sorted(_logged_failures(store, run, tmp_path)[0].split(";")) == sorted(row.failed_series.split(";"))
    # Nothing stored: no SR, no SEG (the segmenter was run on neither), the images alone.
    assert _held(orthanc, study) == (images, {})

    # dicomops predict --pacs: the study failed, nothing stored, the reason the same.
    predicted = predict(pacs_query=SecretStr(f"StudyInstanceUID={study}"), work=work, config=SEG_CONFIG)
    assert (predicted["studies_scored"], predicted["studies_failed"], predicted["results_stored"]) == (0, 1, 0)
    table = pd.read_csv(predicted["results"], keep_default_na=False)
    assert set(table.status) == {"failed"} and set(table.study) == {row.token}
    assert sorted(table.series) == sorted(mapper.uid(s) for s in series)  # both scored, their scores kept
    assert all(r.startswith(f"no report could be written: {CODE} (2); nothing stored") for r in table.reason), \
        list(table.reason)
    assert _held(orthanc, study) == (images, {})

    _assert_nothing_identifying(files, [work, Path(store.removeprefix("sqlite:///")).parent], caplog.text,
                                str(result), str(predicted))
    assert list(staging.glob("*")) == []


def test_the_pacs_lost_while_it_stores_the_results_is_an_outage_and_the_retry_stores_them_once(
        exported_champion: ExportedChampion, store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Orthanc killed (SIGKILL, as a crash) as its answer to the STOW-RS of the study's results
    starts: it has kept them, and the watch never hears so."""
    require_orthanc()
    key, work, staging = key_from_settings(), tmp_path / "work", tmp_path / "staging"
    mapper = KeyedMapper(key)
    port, credentials = free_port(), pacs_credentials()
    files, (refused, other) = refusing_study(tmp_path / "send", index=115, refused=1)
    caplog.set_level(logging.INFO, logger="dicomops")
    since_ms = int(time.time() * 1000)
    expected = {("SR", TINY.model_name): {other}, ("SR", SEGMENTER): {other}, ("SEG", SEGMENTER): {other}}

    with start_orthanc(tmp_path / "pacs", port, credentials, stable_age_s=STABLE_AGE_S) as server:
        study = _send(server, files)
        _wait_stable(server, {study})
        images, _ = _held(server, study)
        token = study_token(key, study)
        proxy = CuttingProxy(port, cut_after=0, on_cut=server.kill, on_post=True)
        try:
            _watch_env(monkeypatch, server, exported_champion)
            monkeypatch.setenv(URL_ENV, proxy.url)  # everything the watch asks goes through the proxy
            with pytest.raises(PacsError, match="storing 3 instances") as lost:
                pacs_watch(work=work, staging=staging, config=SEG_CONFIG)
        finally:
            proxy.close()
        assert proxy.cut.is_set() and server.process.poll() is not None

    # What the watch recorded: nothing of the study (no ledger row, the cursor before it), one failed
    # pass counted against it, nothing half-written, staging removed.
    ledger = WorkLayout(work).pacs.ledger
    assert not ledger.exists() or token not in set(pd.read_csv(ledger, keep_default_na=False).token)
    assert io.read_json(WorkLayout(work).pacs.attempts) == {token: 1}
    assert not list(work.rglob("*.tmp")) and list(staging.glob("*")) == []
    # A pass that recorded no study is no MLflow run (log_pass); one that had would be FAILED.
    assert all(r.info.status == "FAILED" for r in _pass_runs(store, since_ms))

    with start_orthanc(tmp_path / "pacs", port, credentials, stable_age_s=STABLE_AGE_S) as server:
        # The PACS had kept the three objects before it died: the retry must not make them six.
        kept, kinds = _held(server, study)
        assert kinds == expected and kept > images and len(kept) == len(images) + 3
        _pacs_env(monkeypatch, server)
        result = pacs_watch(work=work, staging=staging, config=SEG_CONFIG)
        assert (result["ingested"], result["failed"], result["results_stored"], result["series_failed"]) == \
            (1, 0, 3, 1), result
        assert _held(server, study) == (kept, expected)  # the same UIDs: one copy of each

        (row,) = pd.read_csv(ledger, keep_default_na=False).itertuples()
        assert (row.token, row.status, row.results_stored, row.failed_series) == \
            (token, "ingested", 3, f"{mapper.uid(refused)}:{CODE}")
        assert io.read_json(WorkLayout(work).pacs.attempts) == {}
        finished = [r for r in _pass_runs(store, since_ms) if r.info.status == "FINISHED"]
        assert [r.data.metrics["results_stored"] for r in finished] == [3.0]
        assert _logged_failures(store, finished[0], tmp_path) == [f"{mapper.uid(refused)}:{CODE}"]

        _wait_stable(server, {study})
        time.sleep(2.5)
        again = pacs_watch(work=work, staging=staging, config=SEG_CONFIG)
        assert (again["ingested"], again["results_stored"]) == (0, 0)
        assert _held(server, study) == (kept, expected)

    _assert_nothing_identifying(files, [work, Path(store.removeprefix("sqlite:///")).parent], caplog.text,
                                str(lost.value), str(result))
    assert list(staging.glob("*")) == []
