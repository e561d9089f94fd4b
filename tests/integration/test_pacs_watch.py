"""A study sent to a real Orthanc is ingested without anyone touching a folder, scored by the
champion, and its SR is found again under the original study from the PACS; a study whose answer is
cut off mid-retrieval leaves nothing and is ingested once, whole, on the next pass; a study seen twice
is handled once; a hostile file is quarantined; nothing identifying reaches the work directory,
MLflow, Prefect or staging."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import pandas as pd
import pydicom
import pytest
from pydicom.sr.codedict import codes

import mlflow
from dicomops.deid import scan_for_phi
from dicomops.deid.keys import key_from_settings
from dicomops.layout import WorkLayout
from dicomops.pacs import watch
from dicomops.pacs.changes import ChangesFeed, Cursor
from dicomops.pacs.client import PASSWORD_ENV, URL_ENV, USER_ENV, PacsClient, PacsError
from dicomops.pacs.orthanc import OrthancProcess
from dicomops.pacs.results import SERIES_SCORE
from dicomops.serving.champion import load_champion
from dicomops.training.scoring import SeriesRule
from flows.pacs_watch import pacs_watch
from tests.champion_fixture import CONFIG, TINY, ExportedChampion
from tests.flows.test_ingest_flow import _prefect_database
from tests.hostile import ct_slice
from tests.unit.test_real_files import _needles

from .orthanc_fixture import CuttingProxy, orthanc, synthetic_study  # noqa: F401  (orthanc is a fixture)


class _Raising:
    """An engine that cannot score this study."""

    def __init__(self, real: Any) -> None:
        self.choice, self.contract = real.choice, real.contract

    def probabilities(self, slabs: Any) -> Any:
        raise RuntimeError("a model that cannot score this study")


pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture(scope="module")
def champion(exported_champion: ExportedChampion) -> str:
    """A one-epoch champion of `pacs-classifier`, exported (min_auc 0: promoted by the gate)."""
    return exported_champion.uri


def _pacs_env(monkeypatch: pytest.MonkeyPatch, server: OrthancProcess, url: str | None = None) -> None:
    monkeypatch.setenv(URL_ENV, url or server.url)
    monkeypatch.setenv(USER_ENV, server.credentials.user)
    monkeypatch.setenv(PASSWORD_ENV, server.credentials.password)


def _send(server: OrthancProcess, files: list[Path]) -> str:
    datasets = [pydicom.dcmread(f) for f in files]
    with PacsClient(server.dicomweb_url, server.credentials) as pacs:
        pacs.store(datasets)
    return str(datasets[0].StudyInstanceUID)


def _wait_stable(server: OrthancProcess, study_uids: set[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with ChangesFeed(server.url, server.credentials) as feed:
        while time.monotonic() < deadline:
            if study_uids <= {s.study_uid for s in feed.stable_studies(0)}:
                return
            time.sleep(0.3)
    raise AssertionError(f"{len(study_uids)} studies did not become stable within {timeout} s")


def _objects(server: OrthancProcess, study_uid: str, modality: str) -> list[pydicom.Dataset]:
    """Every object of `modality` the PACS holds under `study_uid`, found by QIDO-RS and fetched by WADO-RS."""
    with PacsClient(server.dicomweb_url, server.credentials) as pacs:
        found = pacs._web.search_for_series(study_instance_uid=study_uid, search_filters={"Modality": modality})
        return [ds for series in found for ds in pacs._web.retrieve_series(
            study_uid, pydicom.Dataset.from_json(series).SeriesInstanceUID)]


def _reports(server: OrthancProcess, study_uid: str) -> list[pydicom.Dataset]:
    """Every SR the PACS holds under `study_uid`."""
    return _objects(server, study_uid, "SR")


@contextlib.contextmanager
def _own_pacs(tmp_path: Path) -> Iterator[tuple[OrthancProcess, PacsClient, ChangesFeed]]:
    """An Orthanc of the test's own, so that no other test's studies are in its feed, with its DICOMweb
    client and changes feed."""
    from dicomops.pacs.orthanc import start_orthanc

    from .conftest import free_port
    from .orthanc_fixture import STABLE_AGE_S, pacs_credentials

    with start_orthanc(tmp_path / "pacs", free_port(), pacs_credentials(), stable_age_s=STABLE_AGE_S) as server, \
            PacsClient(server.dicomweb_url, server.credentials) as pacs, \
            ChangesFeed(server.url, server.credentials) as feed:
        yield server, pacs, feed


def test_studies_from_the_pacs_are_gated_scored_answered_once_and_leak_nothing(
        orthanc: OrthancProcess, champion: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from tests.conftest import PREFECT_HOME

    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion)
    work, staging = tmp_path / "work", tmp_path / "staging"
    clean = synthetic_study(tmp_path / "send-a", slices=12, matrix=128, index=1, vendor="ge")
    hostile_files = synthetic_study(tmp_path / "send-b", slices=12, matrix=128, index=2, vendor="siemens")
    # One slice of the second study with a modality the gate does not take: Orthanc stores it, the
    # gate quarantines that file and keeps the study.
    odd = pydicom.dcmread(hostile_files[0])
    rogue = ct_slice(z=999.0, rows=int(odd.Rows), cols=int(odd.Columns), Modality="MR")
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "SeriesInstanceUID"):
        setattr(rogue, keyword, odd.get(keyword))
    rogue.SeriesInstanceUID = pydicom.uid.generate_uid()
    rogue_path = tmp_path / "rogue.dcm"
    rogue.save_as(rogue_path, enforce_file_format=True)
    # And a slice stored with 512 pixel bytes too few: the PACS holds it so, every retrieval brings
    # it so; the gate quarantines it, where a retrieval that called it a cut transfer never ended.
    short = pydicom.dcmread(hostile_files[1])
    short.SeriesInstanceUID, short.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    short.file_meta.MediaStorageSOPInstanceUID = short.SOPInstanceUID
    short.PixelData = short.PixelData[:-512]
    short_path = tmp_path / "short.dcm"
    short.save_as(short_path, enforce_file_format=True)
    study_a, study_b = _send(orthanc, clean), _send(orthanc, [*hostile_files, rogue_path, short_path])
    _wait_stable(orthanc, {study_a, study_b})

    # A pass whose retrieval is cut off mid-transfer: the flow fails, nothing is staged or recorded,
    # and the cursor stays where it was.
    proxy = CuttingProxy(orthanc.http_port, cut_after=40_000, on_cut=lambda: None)
    _pacs_env(monkeypatch, orthanc, proxy.url)
    with pytest.raises(Exception, match=r"was cut off after \d+ instances"):
        pacs_watch(work=work, staging=staging, config=CONFIG)
    proxy.close()
    assert proxy.cut.is_set()
    assert not (work / "pacs/studies.csv").exists() and list(staging.glob("*")) == []
    assert not (work / "pacs/cursor.json").exists() or json.loads((work / "pacs/cursor.json").read_text())["since"] == 0

    _pacs_env(monkeypatch, orthanc)
    since_ms = int(time.time() * 1000)  # other tests' passes share the champion's store
    result = pacs_watch(work=work, staging=staging, config=CONFIG)
    assert (result["ingested"], result["refused"], result["results_stored"]) == (2, 0, 2)
    ledger = pd.read_csv(work / "pacs/studies.csv", keep_default_na=False)
    assert list(ledger.status) == ["ingested", "ingested"] and list(ledger.results_stored) == [1, 1]
    assert sorted(ledger.quarantined_files) == [0, 2]  # the MR slice and the short one, with their reasons
    quarantined = ledger[ledger.quarantined_files == 2].token.item()
    reasons = pd.read_csv(work / "pacs/studies" / quarantined / "ingest/quarantine.csv", keep_default_na=False)
    assert len(reasons) == 2 and sum("modality" in r for r in reasons.reason) == 1, reasons
    assert "pixel_data_length" in set(reasons.reason), reasons
    accepted = pd.read_parquet(work / "pacs/studies" / ledger.token[0] / "ingest/accepted.parquet")
    assert len(accepted) == 12  # whole: every slice, after the cut-off pass
    # The pass is a run in MLflow beside the batches (the cut-off one handled no study: no run).
    tracking = mlflow.tracking.MlflowClient(champion)
    passes = f"tags.`dicomops.source` = 'pacs-watch' and attributes.start_time >= {since_ms}"
    (run,) = tracking.search_runs([tracking.get_experiment_by_name("dicomops-inference").experiment_id], passes)
    assert run.info.status == "FINISHED" and run.data.tags["dicomops.model"] == TINY.model_name
    assert {k: run.data.metrics[k] for k in ("studies", "studies_ingested", "studies_refused", "results_stored")} == {
        "studies": 2.0, "studies_ingested": 2.0, "studies_refused": 0.0, "results_stored": 2.0}
    logged = pd.read_csv(tracking.download_artifacts(run.info.run_id, "studies.csv", str(tmp_path)),
                         keep_default_na=False)
    assert sorted(logged.token) == sorted(ledger.token) and list(logged.status) == ["ingested", "ingested"]

    for study_uid, files in ((study_a, clean), (study_b, hostile_files)):
        (report,) = _reports(orthanc, study_uid)  # under the original study, from the PACS
        assert report.StudyInstanceUID == study_uid and report.PatientID == pydicom.dcmread(files[0]).PatientID
        sr = hd.sr.Comprehensive3DSR.from_dataset(report)
        evidence = {item.ReferencedSOPInstanceUID
                    for study in sr.CurrentRequestedProcedureEvidenceSequence
                    for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
        assert evidence == {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
        content = json.dumps(report.to_json_dict())
        assert f"{TINY.model_name}" in content
        # The champion scores a series against itself (top_k_contrast): no probability, and the SR
        # neither calls it one nor leaves out how it is computed.
        assert SERIES_SCORE.value in content and f'"{codes.DCM.Probability.value}"' not in content
        assert f"series score: {SeriesRule.of(TINY).describe()}" in content

    # Storing the SRs made both studies change, so they become stable again: seen twice, handled once.
    _wait_stable(orthanc, {study_a, study_b})
    time.sleep(2.5)
    again = pacs_watch(work=work, staging=staging, config=CONFIG)
    assert again["ingested"] == 0 and again["results_stored"] == 0
    assert len(tracking.search_runs([run.info.experiment_id], passes)) == 1
    # (a pass that only met studies already answered is no run)
    assert all(len(_reports(orthanc, uid)) == 1 for uid in (study_a, study_b))
    assert list(staging.glob("*")) == []

    # A study its champion cannot score (a model that raises on its every series) is recorded as
    # failed, with the error's type only, and does not hold back the studies behind it.
    poison = synthetic_study(tmp_path / "send-c", slices=12, matrix=128, index=3, vendor="canon")
    later = synthetic_study(tmp_path / "send-d", slices=12, matrix=128, index=4, vendor="philips")
    study_c, study_d = _send(orthanc, poison), _send(orthanc, later)
    _wait_stable(orthanc, {study_c, study_d})
    real = load_champion(champion, TINY.model_name, models_dir=tmp_path / "models")
    broken = dataclasses.replace(real, engine=_Raising(real.engine))
    with PacsClient(orthanc.dicomweb_url, orthanc.credentials) as pacs:
        failed = watch.handle_study(study_c, pacs, staging, work, CONFIG.ingest, key_from_settings(), broken)
    assert failed.status == "failed" and failed.series_failed == 1
    assert failed.reason == "none of its series could be scored: RuntimeError (1); not answered"
    assert study_c not in failed.reason and _reports(orthanc, study_c) == []
    after = pacs_watch(work=work, staging=staging, config=CONFIG)
    assert (after["ingested"], after["failed"], after["results_stored"]) == (1, 0, 1)  # d answered; c not retried
    assert len(_reports(orthanc, study_d)) == 1 and _reports(orthanc, study_c) == []

    needles = _needles([*clean, *hostile_files, rogue_path, *poison, *later])
    assert {study_a, study_b} <= needles
    for place in (work, Path(champion.removeprefix("sqlite:///")).parent, PREFECT_HOME, _prefect_database()):
        hits = scan_for_phi(place, needles)
        assert hits == [], f"PHI found under {place}: {hits[:5]}"
    assert len(scan_for_phi(tmp_path / "send-a", needles)) > 5  # not vacuous
    assert list(staging.glob("*")) == []
    client = mlflow.tracking.MlflowClient(champion)
    assert client.get_registered_model(TINY.model_name).aliases["champion"]


class _CannotServe:
    """The PACS's client, except that one study always fails in `method` while everything else, the
    changes feed included, answers: its retrieval as Orthanc's does for a study whose stored file it
    lost (HTTP 500), or the store of its results as Orthanc's does for an object it refuses (0110,
    which the client must take for an outage)."""

    def __init__(self, pacs: PacsClient, study_uid: str, method: str) -> None:
        self._pacs, self._study, self._method = pacs, study_uid, method

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pacs, name)

    def retrieve_study(self, study_uid: str, dest: Path) -> list[Path]:
        if self._method == "retrieve_study" and study_uid == self._study:
            raise PacsError(f"retrieving a study: the PACS at {self._pacs.server} answered HTTP 500 Internal Server "
                            "Error")
        return self._pacs.retrieve_study(study_uid, dest)

    def store(self, datasets: Sequence[Any]) -> list[str]:
        if self._method == "store" and str(datasets[0].StudyInstanceUID) == self._study:
            raise PacsError(f"storing {len(datasets)} instances: the PACS at {self._pacs.server} kept 0 of them and "
                            "not the rest (Comprehensive 3D SR Storage: refused, failure reason 0x0110)")
        return self._pacs.store(datasets)


@pytest.mark.parametrize("method", ["retrieve_study", "store"])
def test_a_study_the_pacs_cannot_serve_is_set_aside_after_three_passes_and_the_next_is_answered(
        orthanc: OrthancProcess, champion: str, tmp_path: Path, method: str) -> None:  # noqa: F811
    """An outage stops a pass and the next starts with the same study; but a study that fails pass
    after pass while the PACS answers its feed would hold back every study behind it forever: after
    three passes it is recorded as failed, with the PACS's error and what to do, and the pass goes
    on. A study that goes through is forgotten by the count."""
    work, staging, key = tmp_path / "work", tmp_path / "staging", key_from_settings()
    scorer = load_champion(champion, TINY.model_name, models_dir=tmp_path / "models") if method == "store" else None
    with ChangesFeed(orthanc.url, orthanc.credentials) as feed:  # the studies of the module's other tests: not these
        Cursor(WorkLayout(work).pacs.cursor).advance(feed.last())
    index = 21 if method == "retrieve_study" else 23
    lost = synthetic_study(tmp_path / "send-lost", slices=12, matrix=128, index=index, vendor="canon")
    fine = synthetic_study(tmp_path / "send-fine", slices=12, matrix=128, index=index + 1, vendor="ge")
    study_lost = _send(orthanc, lost)
    time.sleep(1.5)  # stable one after the other: the lost study comes first in the feed
    study_fine = _send(orthanc, fine)
    _wait_stable(orthanc, {study_lost, study_fine})
    token = watch.study_token(key, study_lost)
    attempts = WorkLayout(work).pacs.attempts
    with PacsClient(orthanc.dicomweb_url, orthanc.credentials) as real, \
            ChangesFeed(orthanc.url, orthanc.credentials) as feed:
        pacs = _CannotServe(real, study_lost, method)
        for passes in (1, 2):
            with pytest.raises(PacsError, match="HTTP 500" if method == "retrieve_study" else "0x0110"):
                watch.watch_once(feed, pacs, staging, work, CONFIG.ingest, key, scorer)
            assert json.loads(attempts.read_text()) == {token: passes}
            assert not WorkLayout(work).pacs.ledger.exists()
        outcomes = watch.watch_once(feed, pacs, staging, work, CONFIG.ingest, key, scorer)
        images = watch.images_digest(key, real.image_instances(study_lost))
    assert [o.status for o in outcomes] == ["failed", "ingested"]
    # set aside with the digest of its images: repaired with other images, the watch answers it again
    assert outcomes[0].images == images != ""
    assert watch._handled_here(work, token, images)[0] and not watch._handled_here(work, token, "other")[0]
    reason = outcomes[0].reason
    assert outcomes[0].token == token and "in 3 passes" in reason and "repair the study in the PACS" in reason
    assert ("HTTP 500" if method == "retrieve_study" else "0x0110") in reason and study_lost not in reason
    assert outcomes[1].results_stored == (1 if scorer is not None else 0)
    assert json.loads(attempts.read_text()) == {}
    ledger = pd.read_csv(WorkLayout(work).pacs.ledger, keep_default_na=False)
    assert list(ledger.status) == ["failed", "ingested"] and study_lost not in ledger.to_csv()
    assert list(staging.glob("*")) == []


def test_a_feed_that_starts_again_below_the_cursor_is_read_from_its_start(tmp_path: Path) -> None:
    """Orthanc's change numbers start again at 1 when its index is replaced (the move to PostgreSQL,
    a restore) or the work directory is pointed at another PACS. A cursor kept from before lay
    above every change of the new feed, and every study in it was left unread, silently; now the
    watch and the feedback pass read such a feed from its start (a study handled before would be
    a duplicate)."""
    from dicomops.config import FeedbackConfig
    from dicomops.feedback.pacs import collect_once
    from dicomops.feedback.store import Reviewers
    from dicomops.pacs.orthanc import start_orthanc

    from .conftest import free_port
    from .orthanc_fixture import STABLE_AGE_S, pacs_credentials

    work, staging, key = tmp_path / "work", tmp_path / "staging", key_from_settings()
    for path in (WorkLayout(work).pacs.cursor, WorkLayout(work).feedback.cursor):  # kept from the PACS before
        Cursor(path).advance(10_000)
    with start_orthanc(tmp_path / "pacs", free_port(), pacs_credentials(), stable_age_s=STABLE_AGE_S) as server:
        study = _send(server, synthetic_study(tmp_path / "send", slices=12, matrix=128, index=31, vendor="ge"))
        _wait_stable(server, {study})
        with PacsClient(server.dicomweb_url, server.credentials) as pacs, \
                ChangesFeed(server.url, server.credentials) as feed:
            last = feed.last()
            assert last < 10_000
            outcomes = watch.watch_once(feed, pacs, staging, work, CONFIG.ingest, key, None)
            assert [(o.token, o.status) for o in outcomes] == [(watch.study_token(key, study), "ingested")]
            assert Cursor(WorkLayout(work).pacs.cursor).value == last
            assert watch.watch_once(feed, pacs, staging, work, CONFIG.ingest, key, None) == []  # read once
            collect_once(feed, pacs, work, key, Reviewers.from_config(FeedbackConfig()))
            assert Cursor(WorkLayout(work).feedback.cursor).value == last


class _Wrapped:
    """PacsClient.from_env's client, wrapped: `wrap(client)` decides what fails."""

    def __init__(self, inner: Any, wrap: Any) -> None:
        self._inner, self._wrapped = inner, wrap(inner)

    def __enter__(self) -> Any:
        return self._wrapped

    def __exit__(self, *exc: object) -> None:
        self._inner.close()


class _DownWhenTold:
    """A PACS that stops answering once `state["down"]` is set: every request then fails."""

    def __init__(self, pacs: PacsClient, state: dict[str, bool]) -> None:
        self._pacs, self._state = pacs, state

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._pacs, name)
        if not callable(attribute) or name == "close":
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._state["down"]:
                raise PacsError(f"{name}: the PACS at {self._pacs.server} did not answer (connection refused)")
            return attribute(*args, **kwargs)

        return call


def test_a_batch_fails_a_study_the_pacs_cannot_serve_goes_on_and_keeps_what_it_answered_before_an_outage(
        champion: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`predict --pacs` over a study whose stored file the PACS lost (HTTP 500 for it alone, while it
    answers for the others) stopped the whole batch and recorded nothing; now that study is failed
    with the PACS's error and the others are answered. A PACS that goes down mid-batch still stops
    it, and the studies answered before are recorded (results.csv, a FAILED run saying why)."""
    from dicomops.config import ServeConfig
    from dicomops.pacs.orthanc import start_orthanc
    from dicomops.serving import batch

    from .conftest import free_port
    from .orthanc_fixture import STABLE_AGE_S, pacs_credentials

    key = key_from_settings()
    serve = ServeConfig(write_back=False)
    with start_orthanc(tmp_path / "pacs", free_port(), pacs_credentials(), stable_age_s=STABLE_AGE_S) as server:
        _pacs_env(monkeypatch, server)
        lost = _send(server, synthetic_study(tmp_path / "lost", slices=12, matrix=128, index=43, vendor="canon"))
        fine = _send(server, synthetic_study(tmp_path / "fine", slices=12, matrix=128, index=44, vendor="ge"))
        real_from_env = PacsClient.from_env

        def run(wrap: Any, work: Path, progress: Any = None) -> dict[str, Any]:
            monkeypatch.setattr(PacsClient, "from_env", classmethod(
                lambda cls, *a, **k: _Wrapped(real_from_env(*a, **k), wrap)))
            return batch.run_batch(src=None, query={}, work=work, ingest_cfg=CONFIG.ingest, serve_cfg=serve,
                                   model_name=TINY.model_name, version=None, key=key, tracking_uri=champion,
                                   artifact_root=None, staging=tmp_path / "staging", http_budget_s=30.0,
                                   progress=progress)

        result = run(lambda pacs: _CannotServe(pacs, lost, "retrieve_study"), tmp_path / "work")
        table = pd.read_csv(result["results"], keep_default_na=False)
        by_study = dict(zip(table.study, table.status, strict=True))
        assert by_study == {watch.study_token(key, lost): "failed", watch.study_token(key, fine): "scored"}
        reason = table[table.status == "failed"].reason.iloc[0]
        assert "HTTP 500" in reason and "repair the study in the PACS" in reason and lost not in reason

        state = {"down": False}  # the PACS goes down once the first study is answered

        def answered(done: int, total: int) -> None:
            state["down"] = True

        with pytest.raises(PacsError, match="did not answer"):
            run(lambda pacs: _DownWhenTold(pacs, state), tmp_path / "work-outage", answered)
        (kept,) = (tmp_path / "work-outage" / "predict").glob("*/results.csv")
        assert list(pd.read_csv(kept, keep_default_na=False).status) == ["scored"]
        runs = mlflow.tracking.MlflowClient(champion).search_runs(
            [mlflow.tracking.MlflowClient(champion).get_experiment_by_name("dicomops-inference").experiment_id],
            filter_string="tags.`dicomops.batch.stopped` = 'PacsError'")
        assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert list((tmp_path / "staging").glob("*")) == []


def test_a_study_that_gains_a_series_after_it_was_answered_is_answered_again(
        champion: str, tmp_path: Path) -> None:
    """A second reconstruction sent after the study was first stable and answered: the ledger knew the
    study by its token alone and took every later stable event for a duplicate, so the new series
    was never read. Now a study whose images changed is answered again, and its first series'
    report, the same result on the same images, keeps its UIDs: the PACS holds one copy of it."""
    from .test_pacs_feedback import _stable_again

    key, work, staging = key_from_settings(), tmp_path / "work", tmp_path / "staging"
    scorer = load_champion(champion, TINY.model_name, models_dir=tmp_path / "models")
    first = synthetic_study(tmp_path / "a", slices=12, matrix=128, index=51, vendor="ge")
    second = synthetic_study(tmp_path / "b", slices=12, matrix=128, index=52, vendor="siemens")
    head = pydicom.dcmread(first[0])
    for path in second:  # the same patient and study, another series
        ds = pydicom.dcmread(path)
        for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "StudyDate", "StudyTime",
                        "AccessionNumber", "StudyID"):
            if keyword in head:
                setattr(ds, keyword, head.get(keyword))
        ds.save_as(path)
    with _own_pacs(tmp_path) as (server, pacs, feed):
        study = _send(server, first)
        _wait_stable(server, {study})
        (once,) = watch.watch_once(feed, pacs, staging, work, CONFIG.ingest, key, scorer)
        assert (once.status, once.accepted_series, once.results_stored) == ("ingested", 1, 1)
        last = feed.last()
        _send(server, second)
        _stable_again(server, study, last)
        (again,) = watch.watch_once(feed, pacs, staging, work, CONFIG.ingest, key, scorer)
        assert (again.status, again.accepted_series, again.results_stored) == ("ingested", 2, 2), again
        assert again.reason.startswith("its images changed since it was handled") and again.token == once.token
        assert watch.watch_once(feed, pacs, staging, work, CONFIG.ingest, key, scorer) == []
        answered = {str(s.SeriesInstanceUID) for r in _reports(server, study)
                    for e in r.CurrentRequestedProcedureEvidenceSequence for s in e.ReferencedSeriesSequence}
        assert len(_reports(server, study)) == 2 and answered == {str(head.SeriesInstanceUID),
                                                                   str(pydicom.dcmread(second[0]).SeriesInstanceUID)}
    ledger = pd.read_csv(WorkLayout(work).pacs.ledger, keep_default_na=False)
    assert list(ledger.status) == ["ingested", "ingested"] and ledger["images"].nunique() == 2
    assert study not in ledger.to_csv()


def test_a_study_scored_on_openvino_int8_gets_onnx_runtimes_answer_and_leaks_nothing(
        champion: str, tmp_path: Path) -> None:
    """pacs-watch with ``serve.engine: ov-int8``: the exported QDQ file on OpenVINO answers a study from
    a real PACS (its own, so that no other test's studies are in the pass) with the SR under the
    original study, its score what ONNX Runtime's INT8 gives the same gated series within the
    engines' agreement, and neither the work directory nor the staging area holds the study's
    identifiers."""
    from dicomops.feedback.pacs import _score
    from dicomops.serving.predict import Timer, score_gated

    key, work, staging = key_from_settings(), tmp_path / "work", tmp_path / "staging"
    scorer = load_champion(champion, TINY.model_name, engine="ov-int8", models_dir=tmp_path / "models")
    assert scorer.engine.choice.kind == "ov-int8"
    files = synthetic_study(tmp_path / "send", slices=12, matrix=128, index=61, vendor="philips")
    with _own_pacs(tmp_path) as (server, pacs, feed):
        study = _send(server, files)
        _wait_stable(server, {study})
        (outcome,) = watch.watch_once(feed, pacs, staging, work, CONFIG.ingest, key, scorer)
        assert (outcome.status, outcome.results_stored) == ("ingested", 1), outcome
        (report,) = _reports(server, study)
    served = _score(report)
    assert served is not None
    onnx_runtime = load_champion(champion, TINY.model_name, engine="ort-int8", models_dir=tmp_path / "models")
    (finding,), _ = score_gated(onnx_runtime, work / "pacs/studies" / outcome.token, None, Timer())
    assert abs(served - finding.score) < 0.02
    needles = _needles(files)
    assert scan_for_phi(work, needles) == [] and scan_for_phi(staging, needles) == []
