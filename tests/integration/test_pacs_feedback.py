"""A reader's verified revision of a dicomops report, stored in a real Orthanc, becomes feedback with
provenance under the series' pseudonym; a revision signed by someone who is not a reviewer is refused
with its reason; a second pass stores nothing again; nothing identifying reaches the feedback store."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from dicomops.config import FeedbackConfig
from dicomops.deid import scan_for_phi
from dicomops.deid.keys import KeyedMapper, key_from_settings
from dicomops.feedback.pacs import collect_once, read_assessment, read_report, revise
from dicomops.feedback.store import FeedbackStore, Reviewers
from dicomops.pacs.changes import ChangesFeed
from dicomops.pacs.client import PacsClient
from dicomops.pacs.orthanc import OrthancProcess
from flows.pacs_watch import pacs_watch
from tests.champion_fixture import CONFIG, ExportedChampion
from tests.unit.test_real_files import _needles

from .orthanc_fixture import orthanc, synthetic_study  # noqa: F401  (orthanc is a fixture)
from .test_pacs_watch import _pacs_env, _reports, _send, _wait_stable

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]
ADA, EVE = "Lovelace^Ada", "Mallory^Eve"


def _stable_again(server: OrthancProcess, study_uid: str, after: int, timeout: float = 30.0) -> None:
    """Wait until Orthanc reports the study stable again, after change `after`."""
    deadline = time.monotonic() + timeout
    with ChangesFeed(server.url, server.credentials) as feed:
        while time.monotonic() < deadline:
            if any(s.study_uid == study_uid and s.seq > after for s in feed.stable_studies(0)):
                return
            time.sleep(0.3)
    raise AssertionError(f"the study did not become stable again within {timeout} s")


def test_a_readers_revision_in_the_pacs_becomes_feedback_and_a_stranger_is_refused(
        orthanc: OrthancProcess, exported_champion: ExportedChampion, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", exported_champion.uri)
    _pacs_env(monkeypatch, orthanc)
    work = tmp_path / "work"
    files = synthetic_study(tmp_path / "send", slices=12, matrix=128, index=41, vendor="ge")
    study = _send(orthanc, files)
    _wait_stable(orthanc, {study})
    assert pacs_watch(work=work, staging=tmp_path / "staging", config=CONFIG)["ingested"] == 1
    (ours,) = _reports(orthanc, study)
    report = read_report(ours)
    assert report is not None and report.series_uid == str(pydicom.dcmread(files[0]).SeriesInstanceUID)

    # What a viewer stores when a reader signs their judgement: Ada (a reviewer) disagrees with the
    # model, Eve (not a reviewer) agrees with it.
    ada = revise(ours, present=not report.present, reader=ADA)
    eve = revise(ours, present=report.present, reader=EVE)
    assessment = read_assessment(ada)
    assert not isinstance(assessment, str)
    assert (assessment.reader, assessment.present, assessment.predecessor) == (ADA, not report.present,
                                                                               report.sop_uid)
    if shutil.which("dciodvfy"):
        path = tmp_path / "ada.dcm"
        ada.save_as(path, enforce_file_format=True)
        check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        assert "Error" not in check.stderr, check.stderr
    with ChangesFeed(orthanc.url, orthanc.credentials) as feed:
        last = feed.poll(0).last
    with PacsClient(orthanc.dicomweb_url, orthanc.credentials) as pacs:
        pacs.store([ada, eve])
    _stable_again(orthanc, study, last)

    key = key_from_settings()
    reviewers = Reviewers.from_config(FeedbackConfig(reviewers={ADA: "senior"}))
    with PacsClient(orthanc.dicomweb_url, orthanc.credentials) as pacs, \
            ChangesFeed(orthanc.url, orthanc.credentials) as feed:
        rows = collect_once(feed, pacs, work, key, reviewers)
        assert sorted((r["outcome"], r["reason"]) for r in rows) == [
            ("ours", ""), ("refused", "unknown_reader"), ("stored", "")]
        (item,) = FeedbackStore(work).items().to_dict("records")
        assert (item["reader"], item["role"], item["source"], item["verdict"]) == (ADA, "senior", "pacs-sr", "correct")
        assert item["reader_label"] == int(not report.present) and item["model_label"] == int(report.present)
        assert item["series"] == KeyedMapper(key).uid(report.series_uid)
        assert (item["model"], item["version"]) == (report.model, report.version)
        assert item["vendor"] != "unknown"  # linked to the result pacs-watch recorded for that series

        # The feed read to its end: a second pass finds nothing new and stores nothing again.
        assert collect_once(feed, pacs, work, key, reviewers) == []
    assert len(FeedbackStore(work).items()) == 1

    needles = _needles(files) | {report.sop_uid, str(ada.SOPInstanceUID), str(eve.SOPInstanceUID)}
    assert scan_for_phi(work / "feedback", needles) == []
