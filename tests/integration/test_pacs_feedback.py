"""A reader's verified revision of a dicomops report, stored in a real Orthanc, becomes feedback with
provenance under the series' pseudonym; a revision signed by someone who is not a reviewer is refused
with its reason; a second pass stores nothing again; nothing identifying reaches the feedback store.
Orthanc killed mid-collection: the studies collected stay, the one it died in is taken up whole on
the next pass, and nothing is stored twice."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from dicomops.config import FeedbackConfig
from dicomops.deid import scan_for_phi
from dicomops.deid.keys import KeyedMapper, key_from_settings
from dicomops.feedback.pacs import collect_once, read_assessment, read_report, revise
from dicomops.feedback.seg import ReaderMask, corrected_segmentation
from dicomops.feedback.store import FeedbackStore, Reviewers
from dicomops.pacs.changes import ChangesFeed
from dicomops.pacs.client import PacsClient, PacsError
from dicomops.pacs.orthanc import OrthancProcess
from dicomops.pacs.results import FINDING_TYPE
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
    # And what a segmentation viewer stores: Ada's corrected nodule mask over the series, Eve's too.
    images = [pydicom.dcmread(f) for f in files]
    frames = np.zeros((len(images), 128, 128), dtype=bool)
    frames[4:7, 60:68, 40:48] = True
    ada_seg, eve_seg = (corrected_segmentation(images, frames, reader) for reader in (ADA, EVE))
    # And objects legal in DICOM that no code here expects, each of which once stopped the collection
    # of every report behind it: a signature without the signer's name, a finding coded with a long
    # code value, a SEG without its shared functional groups.
    nameless, long_code = (revise(ours, present=True, reader=ADA) for _ in range(2))
    del nameless.VerifyingObserverSequence[0].VerifyingObserverName
    for item in _content(long_code):
        if "ConceptNameCodeSequence" in item and item.ConceptNameCodeSequence[0].CodeValue == FINDING_TYPE.value:
            code = item.ConceptNameCodeSequence[0]
            del code.CodeValue
            code.LongCodeValue = FINDING_TYPE.value
    odd_seg = corrected_segmentation(images, frames, ADA)
    del odd_seg.SharedFunctionalGroupsSequence
    # And a revision a viewer stored under a SOP Instance UID longer than DICOM's 64 characters:
    # Orthanc keeps it, dicomweb-client will not put it in a request, and every pass once warned
    # and stopped at this study.
    long_uid = revise(ours, present=True, reader=ADA)
    long_uid.SOPInstanceUID = long_uid.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498." + "7" * 50
    with ChangesFeed(orthanc.url, orthanc.credentials) as feed:
        last = feed.poll(0).last
    with PacsClient(orthanc.dicomweb_url, orthanc.credentials) as pacs:
        pacs.store([ada, eve, ada_seg, eve_seg, nameless, long_code, odd_seg, long_uid])
    _stable_again(orthanc, study, last)

    key = key_from_settings()
    reviewers = Reviewers.from_config(FeedbackConfig(reviewers={ADA: "senior"}))
    with PacsClient(orthanc.dicomweb_url, orthanc.credentials) as pacs, \
            ChangesFeed(orthanc.url, orthanc.credentials) as feed:
        rows = collect_once(feed, pacs, work, key, reviewers)
        judged = sorted((r["outcome"], r["reason"]) for r in rows if r["outcome"] != "ours")
        assert judged[:4] == [("refused", "no_finding_evaluation"), ("refused", "no_verifying_observer_name"),
                              ("refused", "uid_not_requestable"), ("refused", "unknown_reader")], judged
        assert judged[4] == ("refused", "unknown_reader") and judged[5][1].startswith("unreadable_seg ("), judged
        assert judged[6:] == [("stored", ""), ("stored", "")], judged
        drawn, item = FeedbackStore(work).items().sort_values("source").to_dict("records")  # pacs-seg, pacs-sr
        assert (item["reader"], item["role"], item["source"], item["verdict"]) == (ADA, "senior", "pacs-sr", "correct")
        assert item["reader_label"] == int(not report.present) and item["model_label"] == int(report.present)
        assert item["series"] == KeyedMapper(key).uid(report.series_uid)
        assert (item["model"], item["version"]) == (report.model, report.version)
        assert item["vendor"] != "unknown"  # linked to the result pacs-watch recorded for that series
        # The corrected SEG: a mask on the series' own slices, one nodule, linked to the same series.
        assert (drawn["source"], drawn["reader"], drawn["reader_label"], drawn["series"]) == (
            "pacs-seg", ADA, 1, item["series"])
        with np.load(work / "feedback" / drawn["mask"]) as npz:
            assert npz["mask"].shape == (12, 128, 128) and int((npz["mask"] > 0).sum()) == 3 * 8 * 8
            assert sorted(npz["ipp_z"].tolist()) == sorted(float(i.ImagePositionPatient[2]) for i in images)
        assert len(ReaderMask.nodules_of(work / "feedback" / drawn["mask"])) == 1

        # The feed read to its end: a second pass finds nothing new and stores nothing again.
        assert collect_once(feed, pacs, work, key, reviewers) == []
    assert len(FeedbackStore(work).items()) == 2

    needles = _needles(files) | {report.sop_uid, *(str(ds.SOPInstanceUID) for ds in (
        ada, eve, ada_seg, eve_seg, nameless, long_code, odd_seg, long_uid))}
    assert scan_for_phi(work / "feedback", needles) == []


def _content(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    """Every content item of an SR's tree."""
    items = []
    for item in ds.get("ContentSequence", []):
        items += [item, *_content(item)]
    return items


class _DiesOnStudy:
    """A PACS client that kills Orthanc (SIGKILL, as a crash would) when asked for the first report of
    `study_uid`: the collection loses its server between two studies' retrievals."""

    def __init__(self, pacs: PacsClient, server: OrthancProcess, study_uid: str) -> None:
        self._pacs, self._server, self._study = pacs, server, study_uid

    def __getattr__(self, name: str) -> object:
        return getattr(self._pacs, name)

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> pydicom.Dataset:
        if study_uid == self._study:
            self._server.kill()
        return self._pacs.retrieve_instance(study_uid, series_uid, sop_uid)


def _reviewed_study(out: Path, index: int) -> tuple[str, list[pydicom.Dataset]]:
    """A study as a site would have it after review: its CT series, a dicomops report calling no
    nodule, and Ada's verified revision calling one."""
    from io import BytesIO

    from dicomops.pacs.results import Finding, encode, structured_report

    images = [pydicom.dcmread(f) for f in synthetic_study(out, slices=4, matrix=64, index=index, vendor="siemens")]
    report = structured_report(images, Finding(present=False, score=0.2, threshold=0.5,
                                               model_name="dicomops-nodule", model_version="3"))
    ours = pydicom.dcmread(BytesIO(encode(report)))
    return str(images[0].StudyInstanceUID), [*images, ours, revise(ours, present=True, reader=ADA)]


def test_orthanc_killed_mid_collection_loses_and_repeats_nothing(tmp_path: Path) -> None:
    from dicomops.pacs.orthanc import start_orthanc

    from .conftest import free_port
    from .orthanc_fixture import STABLE_AGE_S, pacs_credentials, require_orthanc

    require_orthanc()
    work, key, port, credentials = tmp_path / "work", key_from_settings(), free_port(), pacs_credentials()
    reviewers = Reviewers.from_config(FeedbackConfig(reviewers={ADA: "senior"}))
    first, first_objects = _reviewed_study(tmp_path / "a", index=51)
    second, second_objects = _reviewed_study(tmp_path / "b", index=52)
    with start_orthanc(tmp_path / "pacs", port, credentials, stable_age_s=STABLE_AGE_S) as server:
        with PacsClient(server.dicomweb_url, credentials) as pacs:
            pacs.store(first_objects)
            _wait_stable(server, {first})  # the first study is stable before the second arrives: feed order
            pacs.store(second_objects)
            _wait_stable(server, {second})
        with PacsClient(server.dicomweb_url, credentials, timeout_s=5) as pacs, \
                ChangesFeed(server.url, credentials, timeout_s=5) as feed, \
                pytest.raises(PacsError, match="did not answer") as lost:
            collect_once(feed, _DiesOnStudy(pacs, server, second), work, key, reviewers)
        assert server.process.poll() is not None
        assert first not in str(lost.value) and second not in str(lost.value)
        # The first study was collected whole; of the second nothing is stored or marked seen, and
        # the cursor stops before it, so the next pass takes it up again.
        (item,) = FeedbackStore(work).items().to_dict("records")
        assert (item["reader"], item["reader_label"], item["model_label"]) == (ADA, 1, 0)
        seen = pd.read_csv(work / "feedback/pacs_seen.csv", keep_default_na=False)
        assert sorted(seen.outcome) == ["ours", "stored"]
        assert not list(work.rglob("*.tmp")) and not list(work.rglob("*.lock.tmp"))

    with start_orthanc(tmp_path / "pacs", port, credentials, stable_age_s=STABLE_AGE_S) as server, \
            PacsClient(server.dicomweb_url, credentials) as pacs, ChangesFeed(server.url, credentials) as feed:
        rows = collect_once(feed, pacs, work, key, reviewers)
        assert sorted(r["outcome"] for r in rows) == ["ours", "stored"]  # the second study, once
        assert collect_once(feed, pacs, work, key, reviewers) == []
    items = FeedbackStore(work).items()
    mapper = KeyedMapper(key)
    assert sorted(items.series) == sorted(mapper.uid(str(o[0].SeriesInstanceUID)) for o in (first_objects, second_objects))
    needles = {str(ds.get(tag, "")) for o in (first_objects, second_objects) for ds in o
               for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID", "PatientName")}
    assert scan_for_phi(work, needles - {""}) == []
