"""A real Orthanc with DICOMweb on loopback: a synthetic CT study goes in over STOW-RS, shows in
QIDO-RS and in the changes feed once stable, and comes back whole over WADO-RS; wrong credentials
are refused; an outage mid-retrieval (Orthanc killed, or nothing listening) leaves no folder at all;
``dicomops pacs start`` serves until SIGTERM without printing the password."""

from __future__ import annotations

import dataclasses
import os
import stat
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from dicomops.pacs.changes import ChangesFeed, Cursor, StableStudy
from dicomops.pacs.client import (
    PASSWORD_ENV,
    USER_ENV,
    PacsAuthError,
    PacsClient,
    PacsCredentials,
    PacsError,
)
from dicomops.pacs.orthanc import OrthancProcess, start_orthanc
from dicomops.pacs.results import Finding, structured_report

from .conftest import free_port
from .orthanc_fixture import (  # noqa: F401  (orthanc is a fixture: pytest finds it by name)
    STABLE_AGE_S,
    CuttingProxy,
    orthanc,
    pacs_credentials,
    pacs_start,
    require_orthanc,
    stop_by_sigterm,
    synthetic_study,
)

pytestmark = pytest.mark.integration


def _wait_for_stable(feed: ChangesFeed, since: int, study_uid: str, timeout_s: float = 15.0) -> StableStudy:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [s for s in feed.stable_studies(since) if s.study_uid == study_uid]
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no StableStudy change within {timeout_s} s (StableAge {STABLE_AGE_S} s)")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_store_search_stable_change_and_retrieve_whole(orthanc: OrthancProcess, tmp_path: Path) -> None:  # noqa: F811
    files = synthetic_study(tmp_path / "src", slices=4)
    sent = [pydicom.dcmread(f) for f in files]
    study_uid = str(sent[0].StudyInstanceUID)
    cursor = Cursor(tmp_path / "work" / "cursor.json")
    with PacsClient(orthanc.dicomweb_url, orthanc.credentials) as pacs, \
            ChangesFeed(orthanc.url, orthanc.credentials) as feed:
        stored_at = time.monotonic()
        assert sorted(pacs.store(sent)) == sorted(str(ds.SOPInstanceUID) for ds in sent)

        found = pacs.search_studies(StudyInstanceUID=study_uid)
        assert [str(s.StudyInstanceUID) for s in found] == [study_uid]
        assert int(found[0].NumberOfStudyRelatedInstances) == 4
        assert str(found[0].PatientID) == str(sent[0].PatientID)
        assert pacs.search_studies(PatientID="NOBODY-HERE") == []

        stable = _wait_for_stable(feed, cursor.value, study_uid)
        assert time.monotonic() - stored_at >= STABLE_AGE_S * 0.9  # not before StableAge has passed
        cursor.advance(stable.seq)
        assert Cursor(cursor.path).value == stable.seq > 0
        assert study_uid not in cursor.path.read_text() and stable.orthanc_id not in cursor.path.read_text()
        page = feed.poll(cursor.value)
        assert study_uid not in [s.study_uid for s in page] and page.last >= cursor.value

        staging = tmp_path / "staging"
        paths = pacs.retrieve_study(study_uid, staging / "study-a")
    assert _leftovers(staging) == ["study-a"]  # no temporary folder beside it
    assert sorted(p.name for p in paths) == ["00000.dcm", "00001.dcm", "00002.dcm", "00003.dcm"]
    got = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in paths)}
    assert set(got) == {str(ds.SOPInstanceUID) for ds in sent}
    for ds in sent:
        back = got[str(ds.SOPInstanceUID)]
        assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID  # as stored: RLE
        assert back.PixelData == ds.PixelData
        assert np.array_equal(back.pixel_array, ds.pixel_array)
    with pytest.raises(ValueError, match="exists"):
        PacsClient(orthanc.dicomweb_url, orthanc.credentials).retrieve_study(study_uid, staging / "study-a")
    with pytest.raises(PacsError, match="no instance"):
        PacsClient(orthanc.dicomweb_url, orthanc.credentials).retrieve_study("1.2.3.4.5.6.7", staging / "none")
    assert _leftovers(staging) == ["study-a"]


def test_a_result_stored_again_is_kept_once(orthanc: OrthancProcess, tmp_path: Path) -> None:  # noqa: F811
    # The PACS keeps a STOW-RS request and its answer never arrives (the connection drops as the
    # answer starts): the store fails, the study is handled again, and the same result goes again
    # with the same UIDs (results.result_uids), which the PACS accepts and keeps once.
    images = [pydicom.dcmread(f) for f in synthetic_study(tmp_path / "src", slices=4)]
    study_uid = str(images[0].StudyInstanceUID)
    finding = Finding(present=False, score=0.125, threshold=0.5, model_name="dicomops-ct-classifier",
                      model_version="3")
    proxy = CuttingProxy(orthanc.http_port, cut_after=0, on_cut=lambda: None, marker=b"HTTP/1.1 200")
    with PacsClient(orthanc.dicomweb_url, orthanc.credentials) as pacs:
        pacs.store(images)
        first = structured_report(images, finding)
        try:
            with pytest.raises(PacsError):
                PacsClient(proxy.url + "/dicom-web", orthanc.credentials).store([first])
        finally:
            proxy.close()
        assert proxy.cut.is_set()
        assert pacs.report_instances(study_uid) == [(str(first.SeriesInstanceUID), str(first.SOPInstanceUID))]
        again = structured_report(images, finding)
        assert pacs.store([again]) == [str(again.SOPInstanceUID)]
        assert pacs.report_instances(study_uid) == [(str(first.SeriesInstanceUID), str(first.SOPInstanceUID))]
        other = structured_report(images, dataclasses.replace(finding, score=0.25))
        pacs.store([other])
        assert len(pacs.report_instances(study_uid)) == 2


def test_wrong_credentials_are_refused(orthanc: OrthancProcess, tmp_path: Path) -> None:  # noqa: F811
    for auth in (None, (orthanc.credentials.user, "wrong-password"), ("intruder", orthanc.credentials.password)):
        assert requests.get(orthanc.url + "/system", auth=auth, timeout=5).status_code == 401
        assert requests.get(orthanc.dicomweb_url + "studies", auth=auth, timeout=5).status_code == 401
    wrong = PacsCredentials(orthanc.credentials.user, "wrong-password")
    with pytest.raises(PacsAuthError, match="HTTP 401"):
        PacsClient(orthanc.dicomweb_url, wrong).search_studies()
    with pytest.raises(PacsAuthError, match="HTTP 401"):
        PacsClient(orthanc.dicomweb_url, wrong).retrieve_study("1.2.3", tmp_path / "dest")
    with pytest.raises(PacsAuthError, match="HTTP 401"):
        ChangesFeed(orthanc.url, wrong).poll(0)
    assert _leftovers(tmp_path) == []


def _own_non_loopback_address() -> str | None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_clients_not_on_loopback_are_refused_even_with_the_password(orthanc: OrthancProcess) -> None:  # noqa: F811
    address = _own_non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    auth = (orthanc.credentials.user, orthanc.credentials.password)
    assert requests.get(f"{orthanc.url}/system", auth=auth, timeout=5).status_code == 200
    # Orthanc 1.10 listens on every interface; RemoteAccessAllowed: false refuses the rest.
    assert requests.get(f"http://{address}:{orthanc.http_port}/system", auth=auth, timeout=5).status_code in (401, 403)


def test_orthanc_killed_mid_retrieval_leaves_no_study_and_no_temp_folder(tmp_path: Path) -> None:
    require_orthanc()
    credentials = pacs_credentials()
    files = synthetic_study(tmp_path / "src", slices=4, matrix=128)
    sent = [pydicom.dcmread(f) for f in files]
    study_uid = str(sent[0].StudyInstanceUID)
    staging = tmp_path / "staging"
    with start_orthanc(tmp_path / "pacs", free_port(), credentials, stable_age_s=STABLE_AGE_S) as server:
        PacsClient(server.dicomweb_url, credentials).store(sent)
        whole = sum(len(f.read_bytes()) for f in files)
        proxy = CuttingProxy(server.http_port, cut_after=whole // 2, on_cut=server.kill)
        try:
            with pytest.raises(PacsError, match=r"cut off after [1-3] instances") as cut:
                PacsClient(proxy.url + "/dicom-web", credentials).retrieve_study(study_uid, staging / "study-b")
        finally:
            proxy.close()
        assert proxy.cut.is_set() and server.process.poll() is not None  # Orthanc died mid-answer
        assert study_uid not in str(cut.value)
        assert _leftovers(staging) == []
        # Orthanc is gone now: the next attempt fails at once and leaves nothing either.
        with pytest.raises(PacsError, match="did not answer"):
            PacsClient(server.dicomweb_url, credentials, timeout_s=5).retrieve_study(study_uid, staging / "study-b")
    assert _leftovers(staging) == []


def test_a_dead_port_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    pacs = PacsClient(url + "/dicom-web", PacsCredentials("integration", "pw-unused-1"), timeout_s=5)
    started = time.monotonic()
    with pytest.raises(PacsError, match=rf"{url} did not answer.*DICOMOPS_PACS_URL"):
        pacs.retrieve_study("1.2.3.4", tmp_path / "staging" / "study-c")
    with pytest.raises(PacsError, match="did not answer"):
        ChangesFeed(url, PacsCredentials("integration", "pw-unused-1"), timeout_s=5).poll(0)
    assert time.monotonic() - started < 5
    assert _leftovers(tmp_path / "staging") == []


def test_pacs_start_serves_until_sigterm_and_never_prints_the_password(tmp_path: Path) -> None:
    require_orthanc()
    credentials, port = pacs_credentials(), free_port()
    env = {**os.environ, USER_ENV: credentials.user, PASSWORD_ENV: credentials.password, "COLUMNS": "200"}
    storage = tmp_path / "pacs"
    with pacs_start(["--storage", str(storage), "--stable-age", "2"], env, port, credentials) as proc:
        system = requests.get(f"http://127.0.0.1:{port}/system", auth=(credentials.user, credentials.password),
                              timeout=5).json()
        assert system["HttpPort"] == port and system["PluginsEnabled"]
        assert stat.S_IMODE((storage / "orthanc.json").stat().st_mode) == 0o600
        assert stat.S_IMODE(storage.stat().st_mode) == 0o700
        output = stop_by_sigterm(proc)
    assert proc.returncode == 0, output
    assert credentials.password not in output
    text = " ".join(output.split())
    assert f"http://127.0.0.1:{port}/dicom-web/" in text and str(storage / "db") in text
    assert PASSWORD_ENV in text and "stopped (SIGTERM)" in text
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/system", timeout=2)
