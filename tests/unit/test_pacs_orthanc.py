"""The PACS plumbing without a server: Orthanc's rendered configuration (loopback, auth, no DICOM
port, no default password, mode 0600), the template and its Compose service, the changes cursor
(atomic, survives a restart, holds a number only), and the client's guard against a cut-off answer."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import stat
from pathlib import Path

import pydicom
import pytest
import requests
import yaml
from typer.testing import CliRunner
from urllib3 import HTTPResponse

from dicomops.cli import app
from dicomops.pacs.changes import Cursor, StableStudy
from dicomops.pacs.client import (
    PASSWORD_ENV,
    PacsAuthError,
    PacsCredentials,
    PacsError,
    _ClosingBoundary,
    credentials_from_env,
    translate_errors,
)
from dicomops.pacs.orthanc import TEMPLATE, render_config, write_config

ROOT = Path(__file__).resolve().parents[2]
CREDS = PacsCredentials("radiology", "not-a-real-password-1")


def test_no_password_is_an_error_naming_the_variable() -> None:
    for env in ({}, {"DICOMOPS_PACS_USER": "radiology"}, {PASSWORD_ENV: ""}):
        with pytest.raises(ValueError, match=PASSWORD_ENV):
            credentials_from_env(env)
    assert credentials_from_env({PASSWORD_ENV: "pw-1"}) == PacsCredentials("dicomops", "pw-1")
    assert credentials_from_env({PASSWORD_ENV: "pw-1", "DICOMOPS_PACS_USER": "ris"}).user == "ris"


@pytest.mark.parametrize("password", ['with"quote', "back\\slash", "expands${HOME}", "new\nline"])
def test_a_password_orthanc_would_rewrite_or_misparse_is_refused(password: str) -> None:
    with pytest.raises(ValueError, match=PASSWORD_ENV):
        PacsCredentials("radiology", password)


def test_credentials_keep_the_password_out_of_repr() -> None:
    assert "not-a-real-password-1" not in repr(CREDS) and "radiology" in repr(CREDS)


def test_rendered_config_is_loopback_only_with_auth_and_no_dicom_port(tmp_path: Path) -> None:
    config = render_config(tmp_path / "pacs", 18042, CREDS)
    assert config["RemoteAccessAllowed"] is False
    assert config["AuthenticationEnabled"] is True
    assert config["RegisteredUsers"] == {"radiology": "not-a-real-password-1"}
    assert config["DicomServerEnabled"] is False
    assert config["HttpPort"] == 18042 and config["StableAge"] == 10
    assert config["StorageDirectory"] == config["IndexDirectory"] == str(tmp_path / "pacs" / "db")
    assert config["Plugins"] == ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"]
    assert config["DicomWeb"] == {"Enable": True, "Root": "/dicom-web/"}
    assert "${" not in json.dumps(config)  # the template's placeholders are all replaced
    assert config["ExecuteLuaEnabled"] is False and config["RestApiWriteToFileSystemEnabled"] is False


def test_dicom_port_and_stable_age_are_options(tmp_path: Path) -> None:
    config = render_config(tmp_path, 18042, CREDS, dicom_port=11112, stable_age_s=2)
    assert config["DicomServerEnabled"] is True and config["DicomPort"] == 11112 and config["StableAge"] == 2
    for bad in ({"dicom_port": 18042}, {"dicom_port": 0}, {"stable_age_s": 0}):
        with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
            render_config(tmp_path, 18042, CREDS, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="http_port"):
        render_config(tmp_path, 70000, CREDS)


def test_a_broken_template_is_named(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"t\.json"):
        render_config(tmp_path, 18042, CREDS, template=tmp_path / "t.json")


def test_config_is_written_for_its_owner_alone_and_atomically(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = write_config(render_config(tmp_path, 18042, CREDS), tmp_path / "etc" / "orthanc.json")
        path.chmod(0o644)
        write_config(render_config(tmp_path, 18043, CREDS), path)  # a rewrite tightens it again
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["HttpPort"] == 18043
    assert [p.name for p in path.parent.iterdir()] == ["orthanc.json"]  # no temp file left


def test_template_holds_no_password_and_compose_serves_it_on_localhost() -> None:
    template = json.loads(TEMPLATE.read_text())
    assert template["RegisteredUsers"] == {"${DICOMOPS_PACS_USER}": "${DICOMOPS_PACS_PASSWORD}"}
    assert template["AuthenticationEnabled"] is True and template["DicomServerEnabled"] is False
    assert "RemoteAccessAllowed" not in template  # Orthanc's default (false) unless a deployment adds it
    compose = yaml.safe_load((ROOT / "infra" / "docker-compose.yml").read_text())
    service = compose["services"]["orthanc"]
    assert service["image"].startswith(("jodogne/orthanc-plugins:", "orthancteam/orthanc:"))
    assert "./orthanc/orthanc.json:/etc/dicomops/orthanc/orthanc.json:ro" in service["volumes"]
    assert all(str(port).startswith("127.0.0.1:") for port in service["ports"])
    text = (ROOT / "infra" / "docker-compose.yml").read_text()
    assert re.search(r"DICOMOPS_PACS_PASSWORD: \$\{DICOMOPS_PACS_PASSWORD:\?", text)  # no default


def test_cursor_starts_at_zero_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "pacs" / "cursor.json"
    cursor = Cursor(path)
    assert cursor.value == 0 and not path.exists()
    cursor.advance(7)
    cursor.advance(7)
    cursor.advance(12)
    assert Cursor(path).value == 12  # a new process reads where the last one stopped
    assert json.loads(path.read_text()) == {"since": 12}  # a number, no identifier
    assert sorted(p.name for p in path.parent.iterdir()) == ["cursor.json"]
    with pytest.raises(ValueError, match="never moves back"):
        cursor.advance(11)
    assert Cursor(path).value == 12


def test_a_crash_while_advancing_keeps_the_old_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cursor = Cursor(tmp_path / "cursor.json")
    cursor.advance(3)

    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        cursor.advance(9)
    monkeypatch.undo()
    assert cursor.value == 3 and Cursor(tmp_path / "cursor.json").value == 3
    assert [p.name for p in tmp_path.iterdir()] == ["cursor.json"]


@pytest.mark.parametrize("content", ["{", '{"since": -1}', '{"since": "4"}',
                                     '{"since": 4, "study": "1.2.840.1"}'])
def test_a_damaged_cursor_is_named_not_guessed(tmp_path: Path, content: str) -> None:
    (tmp_path / "cursor.json").write_text(content)
    with pytest.raises(ValueError, match=r"cursor\.json"):
        Cursor(tmp_path / "cursor.json")


def test_a_stable_study_keeps_its_identifiers_out_of_repr() -> None:
    study = StableStudy(5, "0d6b5a64-0d0d6b5a", "1.2.826.0.1.3680043.2.1125.1")
    assert repr(study) == "StableStudy(seq=5)"


def _multipart(body: bytes, boundary: str = "b0und") -> requests.Response:
    response = requests.Response()
    response.status_code = 200
    response.headers["Content-Type"] = f'multipart/related; type="application/dicom"; boundary={boundary}'
    response.raw = HTTPResponse(body=io.BytesIO(body), preload_content=False)
    return response


def test_a_multipart_answer_without_its_closing_boundary_is_seen_as_cut_off() -> None:
    whole = b"--b0und\r\nContent-Type: application/dicom\r\n\r\nDATA\r\n--b0und--\r\n"
    for body, complete in ((whole, True), (whole[:-14], False), (whole[:20], False)):
        hook = _ClosingBoundary()
        response = hook(_multipart(body))
        chunks = response.iter_content(7)
        assert next(chunks) == body[:7] and not hook.cut_off  # not decided while the body streams
        assert body[:7] + b"".join(chunks) == body
        assert hook.cut_off is not complete


def test_another_threads_request_does_not_change_what_a_cut_off_answer_said() -> None:
    """One client serves the online service's study threads: thread A's answer was cut off; thread
    B's request starting and ending whole meanwhile must not make A's look whole (or B's cut off)."""
    import threading

    whole = b"--b0und\r\nContent-Type: application/dicom\r\n\r\nDATA\r\n--b0und--\r\n"
    hook = _ClosingBoundary()
    a = hook(_multipart(whole[:20]))
    b"".join(a.iter_content(7))
    assert hook.cut_off

    seen: list[bool] = []

    def other() -> None:
        b"".join(hook(_multipart(whole)).iter_content(7))
        seen.append(hook.cut_off)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen == [False] and hook.cut_off  # each thread reads its own answer's state


def test_http_errors_name_the_server_not_the_url() -> None:
    response = requests.Response()
    response.status_code, response.url = 401, "http://127.0.0.1:1/dicom-web/studies/1.2.840.99"
    with pytest.raises(PacsAuthError, match=PASSWORD_ENV) as refused, \
            translate_errors("retrieving a study", "http://127.0.0.1:1"):
        response.raise_for_status()
    assert "1.2.840.99" not in str(refused.value) and refused.value.__cause__ is None
    with pytest.raises(PacsError, match="did not answer") as down, translate_errors("x", "http://127.0.0.1:1"):
        raise requests.ConnectionError("HTTPConnectionPool: Max retries exceeded with url: /studies/1.2.840.99")
    assert "1.2.840.99" not in str(down.value)


def test_pacs_start_without_a_password_exits_2_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    result = CliRunner().invoke(app, ["pacs", "start", "--port", "18042"])
    assert result.exit_code == 2 and PASSWORD_ENV in result.output


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _fake_orthanc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> Path:
    """An executable standing in for Orthanc, so start-up failures are tested without the package."""
    import dicomops.pacs.orthanc as orthanc

    script = tmp_path / "bin" / "FakeOrthanc"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    monkeypatch.setattr(orthanc, "ORTHANC_EXECUTABLE", str(script))
    return script


def test_an_orthanc_that_exits_while_starting_is_reported_with_its_log(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomops.pacs.orthanc import start_orthanc

    _fake_orthanc(tmp_path, monkeypatch, 'echo "E1130 Bad type for a parameter: StableAge"; exit 3')
    with pytest.raises(RuntimeError, match=r"(?s)code 3.*Bad type for a parameter"), \
            start_orthanc(tmp_path / "pacs", _free_port(), CREDS, dicomweb_plugin=TEMPLATE):
        pass
    assert stat.S_IMODE((tmp_path / "pacs").stat().st_mode) == 0o700


def test_an_orthanc_that_never_answers_times_out_and_is_stopped(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomops.pacs.orthanc import start_orthanc

    _fake_orthanc(tmp_path, monkeypatch, f'echo $$ > {tmp_path}/pid; echo "W starting"; exec sleep 60')
    with pytest.raises(TimeoutError, match=r"(?s)within 1 s.*W starting"), \
            start_orthanc(tmp_path / "pacs", _free_port(), CREDS, dicomweb_plugin=TEMPLATE, startup_timeout_s=1):
        pass
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "pid").read_text()), 0)  # stopped and reaped


@pytest.mark.parametrize("uid", ["1.2.840.113619.2.55.3 ", "1.2.840." + "9" * 70])
def test_a_uid_the_dicomweb_client_will_not_address_is_a_pacs_error_that_does_not_quote_it(uid: str) -> None:
    """dicomweb-client checks a UID before the request and quotes it in its ValueError: a study
    the PACS holds under such a UID must not put it in a log or a Prefect state message."""
    from dicomops.pacs.client import PacsClient

    with PacsClient("http://127.0.0.1:9/dicom-web", CREDS, timeout_s=1) as pacs, pytest.raises(PacsError) as err:
        pacs.instance_uids(uid)  # refused before any request: no server needed
    assert "ValueError" in str(err.value) and uid.strip() not in str(err.value) and "113619" not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_pacs_watch_records_a_study_it_can_never_retrieve_and_moves_on(tmp_path: Path) -> None:
    """A study the PACS holds under a UID DICOMweb cannot address is refused in the ledger, by its
    token, with what to do; it is not an outage that stops the watch at that study on every pass."""
    from dicomops.config import IngestConfig
    from dicomops.layout import WorkLayout
    from dicomops.pacs.client import PacsClient
    from dicomops.pacs.watch import handle_study, handled_tokens, study_token

    key, work, staging = b"k" * 32, tmp_path / "work", tmp_path / "staging"
    uid = "1.2.840.113619.2.55.3.x"
    with PacsClient("http://127.0.0.1:9/dicom-web", CREDS, timeout_s=1) as pacs:
        outcome = handle_study(uid, pacs, staging, work, IngestConfig(), key)
    assert (outcome.status, outcome.token) == ("refused", study_token(key, uid))
    assert "not a valid DICOM UID" in outcome.reason and "correct the study's UIDs" in outcome.reason
    assert handled_tokens(work) == {outcome.token} and not list(staging.glob("*"))
    ledger = WorkLayout(work).pacs.ledger.read_text()
    assert "113619" not in ledger and uid not in ledger


class _StagesOneFile:
    """A PACS whose study arrives as one file."""

    def image_instances(self, study_uid: str) -> dict[str, str]:
        return {"1.2.3.4.1": "1.2.3.4.2"}

    def retrieve_study(self, study_uid: str, dest: Path) -> list[Path]:
        dest.mkdir(parents=True)
        (dest / "00000.dcm").write_bytes(b"DICM")
        return [dest / "00000.dcm"]


def test_a_full_disk_is_an_outage_not_the_studys_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine running out of disk space while a study is gated (or answered) is not the
    study's doing: the watch raises (an outage: the next pass takes the study again) and records
    nothing; any other error of the gate records the study failed, by its type."""
    import errno

    from dicomops import ingest
    from dicomops.config import IngestConfig
    from dicomops.errors import local_outage
    from dicomops.pacs.watch import handle_study, handled_tokens
    from dicomops.serving import predict

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "work" / "x.parquet"))
    assert local_outage(full) == "ENOSPC: no space left on device"
    try:
        try:
            raise full
        except OSError as inner:
            raise RuntimeError("a library's own error") from inner
    except RuntimeError as wrapped:
        assert local_outage(wrapped) == "ENOSPC: no space left on device"
    assert local_outage(OSError(errno.EACCES, "Permission denied")) is None and local_outage(ValueError()) is None

    key, work, staging = b"k" * 32, tmp_path / "work", tmp_path / "staging"
    monkeypatch.setattr(ingest, "run", lambda *a, **k: (_ for _ in ()).throw(full))
    with pytest.raises(OSError, match="No space left"):
        handle_study("1.2.3.4", _StagesOneFile(), staging, work, IngestConfig(), key)
    assert handled_tokens(work) == set() and not list(staging.glob("*"))
    with pytest.raises(OSError, match="No space left"):  # the path a batch and the online service take
        predict.answer_staged("t", tmp_path, tmp_path / "w", IngestConfig(), key, champion=None)  # type: ignore[arg-type]

    monkeypatch.setattr(ingest, "run", lambda *a, **k: (_ for _ in ()).throw(ValueError("1.2.3.4 is odd")))
    outcome = handle_study("1.2.3.4", _StagesOneFile(), staging, work, IngestConfig(), key)
    assert (outcome.status, outcome.reason) == ("failed", "ValueError during the ingest gate; not answered")
    assert handled_tokens(work) == {outcome.token}


def test_a_full_disk_while_the_real_gate_de_identifies_is_an_outage(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate's biggest write is the de-identified copy of each file: a full disk there is raised
    out of the worker map (not each file quarantined as deid_failed, the study then recorded with no
    files behind it), and the watch records nothing."""
    import errno
    import shutil

    from dicomops import io as dio
    from dicomops.config import IngestConfig
    from dicomops.pacs.watch import handle_study, handled_tokens
    from dicomops.synthetic.corpus import SeriesPlan, write_series

    plan = SeriesPlan(index=0, seed=5, scenario="baseline", vendor="ge", label=0, nodule_count=0, fault=None,
                      fault_detail="", matrix=128, slices=8)
    write_series(plan, tmp_path / "src")

    class _Sends:
        def image_instances(self, study_uid: str) -> dict[str, str]:
            return {p.name: "series" for p in (tmp_path / "src" / plan.case / "series-1").iterdir()}

        def retrieve_study(self, study_uid: str, dest: Path) -> list[Path]:
            shutil.copytree(tmp_path / "src" / plan.case / "series-1", dest)
            return sorted(dest.iterdir())

    real = dio.write_bytes

    def full(path: Path, data: bytes) -> Path:
        if Path(path).suffix == ".dcm":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(dio, "write_bytes", full)
    work, staging = tmp_path / "work", tmp_path / "staging"
    with pytest.raises(OSError, match="ENOSPC"):
        handle_study("1.2.3.4", _Sends(), staging, work, IngestConfig(workers=1), b"k" * 32)
    assert handled_tokens(work) == set() and not list(staging.glob("*"))


def test_a_search_answer_with_an_odd_date_warns_nothing_that_quotes_it() -> None:
    """pydicom warns "Invalid value for VR DA: '2024-01-01'" while parsing a QIDO answer: with the
    filters the process has (``dicomops/__init__.py``), that text (a study date, PHI) is not issued."""
    import threading
    import warnings
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from dicomops.pacs.client import PacsClient

    answer = json.dumps([{"00080020": {"vr": "DA", "Value": ["2024-01-01"]},
                          "0020000D": {"vr": "UI", "Value": ["1.2.826.0.1.3680043.10.99.7"]}}]).encode()

    class Qido(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the client pages until an empty page: the study, then none
            page = answer if "offset=" not in self.path or "offset=0" in self.path else b"[]"
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Qido)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with warnings.catch_warnings(record=True) as said, \
                PacsClient(f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web", CREDS, timeout_s=5) as pacs:
            (study,) = pacs.search_studies()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert study.StudyDate == "2024-01-01"  # parsed as sent
    assert not [str(w.message) for w in said if "2024" in str(w.message)], [str(w.message) for w in said]


def _instance(sop_class: str, study: str, sop: str) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID = sop_class, sop, study
    ds.SeriesInstanceUID, ds.PatientName = sop + ".1", "Doe^Jane"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, sop
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    return ds


SR_CLASS, SEG_CLASS = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.66.4"
STUDY, SR_UID, SEG_UID = "1.2.826.0.1.3680043.10.99.1", "1.2.826.0.1.3680043.10.99.2", "1.2.826.0.1.3680043.10.99.3"


@pytest.mark.parametrize(("status", "failed", "listed", "expected"), [
    (200, {}, [{SR_UID, SEG_UID}], "stored"),
    # A PACS that lists what it said it stored a moment later: asked again, not a refusal.
    (200, {}, [{SR_UID}, {SR_UID, SEG_UID}], "stored"),
    # A SOP class the PACS does not store (0x0122) beside one it stored: the PACS will say so again.
    (202, {SEG_UID: 0x0122}, [{SR_UID}], "refused 1"),
    # None stored, for reasons of the objects (0xC000 cannot understand): refused, not an outage.
    (409, {SR_UID: 0xC000, SEG_UID: 0xC000}, [set()], "refused 0"),
    # None stored, for lack of resources or a processing failure (Orthanc's only reason): an outage.
    (409, {SR_UID: 0xA700, SEG_UID: 0x0110}, [set()], "outage"),
    # The SR kept (now or by an earlier pass), the SEG refused for lack of resources: still an outage.
    (202, {SEG_UID: 0xA700}, [{SR_UID}], "outage"),
    # "Stored", but a filter dropped the SEG (Orthanc's ReceivedInstanceFilter answers so).
    (200, {}, [{SR_UID}], "refused 1"),
    # Answers that say nothing usable of the SEG: a failure without its reason, an empty 200, a 409
    # whose body is not DICOM (a gateway's): outages, never taken for a lasting refusal or a bug.
    (202, {SEG_UID: None}, [{SR_UID}], "outage"),
    (200, "", [{SR_UID}], "outage"),
    (409, '{"HttpError": "Conflict"}', [set()], "outage"),
])
def test_a_store_is_checked_against_what_the_pacs_holds_and_a_lasting_refusal_is_told_from_an_outage(
        status: int, failed: dict[str, int | None] | str, listed: list[set[str]], expected: str) -> None:
    """STOW-RS answers per instance (PS3.18: 200 all stored, 202 some failed, 409 none stored, each
    failure with its reason), and a PACS may answer "stored" for what a filter dropped: the client
    asks which instances the PACS holds in the study, and a refusal the PACS will repeat is
    PacsStoreRefused (with how many it kept), an outage a plain PacsError. The messages name SOP
    classes, no UID."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from dicomops.pacs.client import PacsClient, PacsStoreRefused

    def item(sop: str, sop_class: str, reason: int | bool | None = False) -> dict[str, object]:
        out: dict[str, object] = {"00081150": {"vr": "UI", "Value": [sop_class]}, "00081155": {"vr": "UI", "Value": [sop]}}
        if reason is False:  # stored
            return out
        return out | {"00081197": {"vr": "US", "Value": [reason]} if reason is not None else {"vr": "US"}}

    classes = {SR_UID: SR_CLASS, SEG_UID: SEG_CLASS}
    if isinstance(failed, str):  # a body of the PACS's own
        stow, failed = failed.encode(), {}
    else:
        stow = json.dumps({
            "00081198": {"vr": "SQ", "Value": [item(sop, classes[sop], reason) for sop, reason in failed.items()]},
            "00081199": {"vr": "SQ", "Value": [item(sop, classes[sop]) for sop in classes if sop not in failed]},
        }).encode()
    asked: list[str] = []

    class Pacs(BaseHTTPRequestHandler):
        def _answer(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            asked.append("stow")
            self._answer(status, stow)

        def do_GET(self) -> None:  # QIDO-RS: a series' instances, paged by offset; a listing per state
            first = "offset=" not in self.path or "offset=0" in self.path
            held = listed[min(sum(a == "qido" for a in asked) // 2, len(listed) - 1)] if first else set()
            if first:
                asked.append("qido")
            found = [{"00080018": {"vr": "UI", "Value": [sop]}} for sop in sorted(held)
                     if f"/studies/{STUDY}/series/{sop}.1/instances" in self.path]  # each its own series
            self._answer(200, json.dumps(found).encode())

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Pacs)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with PacsClient(f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web", CREDS, timeout_s=5) as pacs:
            batch = [_instance(SR_CLASS, STUDY, SR_UID), _instance(SEG_CLASS, STUDY, SEG_UID)]
            if expected == "stored":
                assert pacs.store(batch) == [SR_UID, SEG_UID]
                return
            with pytest.raises(PacsError) as err:
                pacs.store(batch)
    finally:
        httpd.shutdown()
        httpd.server_close()
    message = str(err.value)
    assert "99" not in message.replace(str(httpd.server_address[1]), ""), message  # no UID of the batch
    if expected == "outage":
        assert not isinstance(err.value, PacsStoreRefused)
        assert ("HTTP 409" if stow.startswith(b'{"Http') else "may take them later") in message
        return
    assert isinstance(err.value, PacsStoreRefused) and err.value.stored == int(expected.split()[1])
    assert "Segmentation Storage" in message and "make the PACS store these objects" in message
    if failed:
        assert f"failure reason 0x{failed[SEG_UID]:04X}" in message
        assert asked.count("qido") == 2  # refused in so many words: no second listing
    else:
        assert "reported stored, not found in its series" in message
        assert asked.count("qido") == 8  # asked again three times before deciding (two series each time)


def test_an_index_in_postgresql_is_parsed_without_a_password_and_rendered_for_its_plugin(tmp_path: Path) -> None:
    from dicomops.pacs.orthanc import INDEX_PLUGIN, OrthancIndex

    index = OrthancIndex.from_url("postgresql://orthanc@db.example:5433/pacs", "s3cret-Pw")
    assert (index.host, index.port, index.database, index.user, index.password) == (
        "db.example", 5433, "pacs", "orthanc", "s3cret-Pw")
    with pytest.raises(ValueError, match="without a password") as refused:
        OrthancIndex.from_url("postgresql://orthanc:leaked@db.example/pacs", "x")
    assert "leaked" not in str(refused.value)
    with pytest.raises(ValueError, match="another scheme") as refused:
        OrthancIndex.from_url("orthanc:leaked@db.example:5432/pacs", "x")  # no scheme: user:password@...
    assert "leaked" not in str(refused.value)
    with pytest.raises(ValueError, match="DICOMOPS_PACS_INDEX_PASSWORD"):
        OrthancIndex.from_url("postgresql://orthanc@db.example/pacs", None)
    with pytest.raises(ValueError, match=r"\$\{"):
        OrthancIndex("db", 5432, "pacs", "orthanc", "pw${HOME}")
    config = render_config(tmp_path, 8042, CREDS, index=index)
    assert config["PostgreSQL"] | {"Password": ""} == {
        "EnableIndex": True, "EnableStorage": False, "Host": "db.example", "Port": 5433, "Database": "pacs",
        "Username": "orthanc", "Password": "", "Lock": True, "MaximumConnectionRetries": 10,
        "ConnectionRetryInterval": 5}
    assert config["Plugins"][-1] == str(INDEX_PLUGIN) and "PostgreSQL" not in render_config(tmp_path, 8042, CREDS)


def test_pacs_watch_scores_with_the_version_engine_and_threads_the_serve_section_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a batch does: the watch loaded the champion alias on the automatic engine with two
    threads whatever `serve` said, so a site serving its challenger, or INT8, answered the PACS's
    new studies with another model than its batches."""
    from dicomops.config import IngestConfig, ServeConfig
    from dicomops.pacs import watch
    from dicomops.serving import champion

    asked: dict[str, object] = {}

    class _Stop(Exception):
        pass

    def load(tracking_uri: str, name: str, **kwargs: object) -> None:
        asked.update(kwargs)
        raise _Stop

    monkeypatch.setattr(champion, "load_champion", load)
    serve = ServeConfig(alias="challenger", engine="ort-int8", threads=3)
    with pytest.raises(_Stop):
        watch.watch_pacs(None, tmp_path, tmp_path / "staging", IngestConfig(), b"k" * 32, "sqlite:///x.db", "m",
                         5.0, serve=serve)
    assert (asked["alias"], asked["engine"], asked["threads"]) == ("challenger", "ort-int8", 3)


def test_a_studys_images_leave_out_results_annotations_and_documents(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the ledger's digest and the cache key are of: a reader's presentation state or a PDF
    stored in the study later is not a new image (it made pacs-watch answer the study again)."""
    from dicomops.pacs.client import PacsClient

    classes = {"1.1": "1.2.840.10008.5.1.4.1.1.2", "1.2": "1.2.840.10008.5.1.4.1.1.88.34",
               "1.3": "1.2.840.10008.5.1.4.1.1.66.4", "1.4": "1.2.840.10008.5.1.4.1.1.11.1",
               "1.5": "1.2.840.10008.5.1.4.1.1.104.1", "1.6": "1.2.840.10008.5.1.4.1.1.7"}
    found = [{"00080016": {"Value": [c]}, "00080018": {"Value": [sop]}, "0020000E": {"Value": ["9.9"]}}
             for sop, c in classes.items()]
    with PacsClient("http://127.0.0.1:9/dicom-web", CREDS, timeout_s=1) as pacs:
        monkeypatch.setattr(pacs._web, "search_for_instances", lambda **kwargs: found)
        assert pacs.image_instances("1.2.3") == {"1.1": "9.9", "1.6": "9.9"}  # CT and a secondary capture
