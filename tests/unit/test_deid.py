"""De-identification: Annex E actions, options, nested sequences, private tags, UIDs, dates, keys."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomops.config import DeidConfig, IngestConfig
from dicomops.deid import Deidentifier, KeyedMapper, scan_for_phi
from dicomops.deid.keys import load_or_create_key
from dicomops.ingest import write_reid_key
from tests.hostile import ct_slice, to_bytes

KEY = b"deid-test-key-0123456789abcdef01"


def _rich_slice() -> Dataset:
    ds = ct_slice(PatientName="DOE^JANE^Q", PatientBirthDate="19610203", AccessionNumber="ACC998877",
                  InstitutionName="Saint Aldric General Hospital", ReferringPhysicianName="WHO^DR",
                  StationName="CT-ROOM-2", DeviceSerialNumber="SN-4411", PatientAge="063Y",
                  PatientSex="F", PatientWeight=71.5, ContentDate="20240102", StudyTime="101500",
                  AcquisitionDateTime="20240102101510.5", PatientAddress="12 Juniper Lane, Millbrook",
                  ImageComments="Patient Jane Doe, MRN 554433", FrameOfReferenceUID="1.2.3.4.99")
    other = Dataset()
    other.PatientID = "OLD-MRN-1"
    other.IssuerOfPatientID = "HOSPITAL-A"
    ds.OtherPatientIDsSequence = Sequence([other])
    nested = Dataset()
    nested.PersonName = "NURSE^BETTY"
    nested.EvaluatorName = "NURSE^CAROL"  # a person name Annex E does not list
    nested.ReferencedSOPInstanceUID = "1.2.3.4.777"
    nested.ReferencedSOPClassUID = pydicom.uid.CTImageStorage
    nested.StudyDate = "20240102"
    ds.ReferencedImageSequence = Sequence([nested])
    block = ds.private_block(0x0009, "VENDOR X", create=True)
    block.add_new(0x01, "LO", "DOE^JANE")
    return ds


@pytest.fixture()
def deid() -> Deidentifier:
    return Deidentifier(KeyedMapper(KEY))


def test_identifiers_are_removed_and_characteristics_kept(deid: Deidentifier) -> None:
    ds = deid.dataset(_rich_slice())
    text = str(ds)
    for value in ("DOE", "JANE", "19610203", "ACC998877", "Saint Aldric", "WHO^DR", "Juniper",
                  "554433", "OLD-MRN-1", "NURSE", "HOSTILE-001", "VENDOR X"):
        assert value not in text, value
    assert ds.PatientID.startswith("PX-") and ds.PatientName == ds.PatientID
    assert ds.PatientBirthDate == ""  # Z in Annex E: kept, zero length (birth dates are never shifted)
    assert (ds.PatientAge, ds.PatientSex, float(ds.PatientWeight)) == ("063Y", "F", 71.5)
    assert (ds.StationName, ds.DeviceSerialNumber) == ("CT-ROOM-2", "SN-4411")
    assert ds.Manufacturer == "ACME" and float(ds.KVP) == 120 and ds.StudyTime == "101500"
    assert ds.PatientIdentityRemoved == "YES"
    codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107", "113108", "113109"]


def test_private_tags_and_nested_sequences_are_cleaned(deid: Deidentifier) -> None:
    ds = deid.dataset(_rich_slice())
    assert not any(elem.tag.is_private for elem in ds.iterall())
    assert "OtherPatientIDsSequence" not in ds  # X in Annex E
    ref = ds.ReferencedImageSequence[0]
    assert ref.PersonName == "ANONYMIZED"  # (0040,A123) is D in Annex E: a dummy name, however deep
    assert ref.EvaluatorName == ""  # a name the table leaves out: the safety net empties it
    assert ref.ReferencedSOPInstanceUID == KeyedMapper(KEY).uid("1.2.3.4.777")
    assert ref.ReferencedSOPClassUID == pydicom.uid.CTImageStorage  # standard UIDs stay
    assert ref.StudyDate == KeyedMapper(KEY).shift_date("20240102", "HOSTILE-001")


def test_uids_are_remapped_in_file_meta_and_consistently_across_batches() -> None:
    first = Deidentifier(KeyedMapper(KEY)).dataset(_rich_slice())
    original = _rich_slice()
    second_batch = Deidentifier(KeyedMapper(KEY)).dataset(_rich_slice())
    other_key = Deidentifier(KeyedMapper(b"another-key-0123456789abcdef012")).dataset(_rich_slice())
    for uid in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert first[uid].value == second_batch[uid].value != original[uid].value
        assert first[uid].value != other_key[uid].value
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID != original.SOPInstanceUID
    assert first.PatientID == second_batch.PatientID != other_key.PatientID


def test_dates_shift_by_one_offset_per_patient(deid: Deidentifier) -> None:
    ds = deid.dataset(_rich_slice())

    def days(a: str, b: str) -> int:
        return (dt.datetime.strptime(a[:8], "%Y%m%d") - dt.datetime.strptime(b[:8], "%Y%m%d")).days

    shift = days("20240102", ds.StudyDate)
    assert 2922 <= shift < 2922 + 730
    assert days("20240102", ds.ContentDate) == shift
    assert days("20240102", ds.AcquisitionDateTime) == shift and ds.AcquisitionDateTime.endswith("101510.5")
    later = _rich_slice()
    later.StudyDate, later.SeriesInstanceUID = "20240110", "1.2.3.4.6"  # same patient, next study
    assert days("20240110", deid.dataset(later).StudyDate) == shift
    mapper = KeyedMapper(KEY)
    offsets = {mapper.date_offset_days(f"P{i}") for i in range(50)}
    assert len(offsets) > 40  # per patient, not one global shift


def test_written_file_reads_back_with_a_zero_preamble(deid: Deidentifier, tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(to_bytes(_rich_slice())))
    ds.preamble = b"MZ" + b"\x90" * 126
    deid.dataset(ds)
    ds.save_as(tmp_path / "out.dcm", enforce_file_format=True)
    raw = (tmp_path / "out.dcm").read_bytes()
    assert raw[:128] == b"\x00" * 128
    assert pydicom.dcmread(tmp_path / "out.dcm").PatientIdentityRemoved == "YES"


def test_scan_for_phi_finds_values_in_every_format(tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_bytes(to_bytes(_rich_slice()))
    pd.DataFrame({"x": ["Jane Doe was here"] * 200}).to_parquet(tmp_path / "t.parquet")
    import sqlite3

    con = sqlite3.connect(tmp_path / "m.db")
    con.execute("create table t (v text)")
    con.execute("insert into t values ('ACC998877')")
    con.commit()
    con.close()
    (tmp_path / "r.html").write_text("<td>Saint Aldric General Hospital</td>")
    hits = scan_for_phi(tmp_path, ["DOE^JANE", "jane doe", "ACC998877", "saint aldric", "ab"])
    found = {(Path(h.path).name, h.needle) for h in hits}
    assert ("a.dcm", "DOE^JANE") in found and ("a.dcm", "ACC998877") in found
    assert ("t.parquet", "jane doe") in found and ("m.db", "ACC998877") in found
    assert ("r.html", "saint aldric") in found
    # One file named as the root is scanned too (the leak tests name Prefect's database file).
    assert [(Path(h.path).name, h.needle) for h in scan_for_phi(tmp_path / "m.db", ["ACC998877"])] == [
        ("m.db", "ACC998877")] * 2  # in its bytes and in its table
    assert not any(h.needle == "ab" for h in hits)  # too short to mean anything
    assert scan_for_phi(tmp_path, ["nothing-like-this"]) == []
    # Whole tokens only: a date inside a long numeric UID is not a hit, the date alone is.
    (tmp_path / "uid.txt").write_text("UID 2.25.232023091588184 and on 20230915 seen")
    dates = {Path(h.path).name for h in scan_for_phi(tmp_path, ["20230915"])}
    assert dates == {"uid.txt"}
    (tmp_path / "uid.txt").write_text("UID 2.25.232023091588184")
    assert scan_for_phi(tmp_path, ["20230915"]) == []
    # Nor a short ID inside a UUID (Prefect's ids), even glued to what precedes it as in a SQLite
    # file's bytes, while the ID alone and a UUID needle are found.
    run = "3f2a1b4c-0010-4abc-8def-0123456789ab"
    (tmp_path / "uid.txt").write_text(f"flow run {run.upper()} and x{run}9")
    assert scan_for_phi(tmp_path, ["0010"]) == []
    assert {h.needle for h in scan_for_phi(tmp_path, [run, "0010"])} == {run}
    (tmp_path / "uid.txt").write_text("patient 0010")
    assert {h.needle for h in scan_for_phi(tmp_path, ["0010"])} == {"0010"}
    (tmp_path / "uid.txt").unlink()
    con = sqlite3.connect(tmp_path / "runs.db")
    con.execute("create table run (name text, kind text, id text)")
    con.executemany("insert into run values (?, ?, ?)", [("ingest-gate", "credentials", run), ("a", "b", run)])
    con.commit()
    con.close()
    assert scan_for_phi(tmp_path / "runs.db", ["0010"]) == []
    assert {h.where for h in scan_for_phi(tmp_path / "runs.db", [run])} == {"bytes", "run"}


def test_key_is_created_once_outside_the_work_dir(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "deid.key"
    first = load_or_create_key(None, path)
    assert load_or_create_key(None, path) == first and len(first) == 64
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_key("explicit-secret-0123456789") == b"explicit-secret-0123456789"
    with pytest.raises(ValueError, match="DICOMOPS_DEID_KEY"):
        KeyedMapper(b"short")


def test_reid_key_only_outside_work(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    pd.DataFrame({"PatientID": ["MRN1", "MRN2"]}).to_csv(src / "labels.csv", index=False)
    inside = IngestConfig(deid=DeidConfig(reid_key_path=tmp_path / "work" / "key.csv"))
    with pytest.raises(ValueError, match="inside the work directory"):
        write_reid_key(src, tmp_path / "work", inside, KEY)
    outside = IngestConfig(deid=DeidConfig(reid_key_path=tmp_path / "vault" / "key.csv"))
    path = write_reid_key(src, tmp_path / "work", outside, KEY)
    assert path == (tmp_path / "vault" / "key.csv").resolve()
    assert path.stat().st_mode & 0o777 == 0o600  # the one file linking pseudonyms to patients: owner only
    assert not (tmp_path / "work").exists()
    assert write_reid_key(src, tmp_path / "work", IngestConfig(), KEY) is None  # no path configured: no key file
    table = pd.read_csv(path)
    assert table.PatientID.tolist() == ["MRN1", "MRN2"]
    assert table.pseudonym.tolist() == [KeyedMapper(KEY).pseudonym(p) for p in ("MRN1", "MRN2")]


def test_the_profile_is_defined_once_and_written_from_that_definition(deid: Deidentifier) -> None:
    from dicomops.deid.profile import METHOD_CODES, PROFILE_NAME, PROFILE_TAG, TABLE_VERSION

    ds = deid.dataset(_rich_slice())
    written = [(item.CodeValue, item.CodeMeaning) for item in ds.DeidentificationMethodCodeSequence]
    assert written == list(METHOD_CODES)
    assert ds.DeidentificationMethod.startswith("PS3.15 E.1 " + " ".join(c for c, _ in METHOD_CODES))
    assert len(ds.DeidentificationMethod) <= 64  # LO
    assert all(meaning in PROFILE_NAME for _, meaning in METHOD_CODES)
    assert PROFILE_TAG == "deid.profile"
    assert DeidConfig().table_version == TABLE_VERSION


def test_the_scan_skips_only_exact_copies_of_the_assets_the_package_ships(tmp_path: Path) -> None:
    from dicomops.validation.docs import ASSETS_DIR

    css = next(ASSETS_DIR.rglob("fontawesome.min.css"))
    assert "university" in css.read_text().lower()  # an icon name, not a patient's institution
    (tmp_path / "copy.css").write_bytes(css.read_bytes())
    (tmp_path / "edited.css").write_bytes(css.read_bytes() + b"\n/* a changed copy */")
    hits = scan_for_phi(tmp_path, ["University"])
    assert [Path(h.path).name for h in hits] == ["edited.css"]


def test_pydicom_log_records_never_quote_a_header_value(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import pydicom.misc

    import dicomops  # noqa: F401  (installs the filter)

    with caplog.at_level(logging.WARNING, logger="pydicom"):
        pydicom.misc.warn_and_log("Invalid value for VR UI: '1.2.840.SECRET.4'")
    assert caplog.records and all("SECRET" not in r.getMessage() for r in caplog.records)
    assert "withheld" in caplog.records[-1].getMessage()


def _first_start(path: str, barrier: Any, out: Any) -> None:
    from dicomops.deid.keys import load_or_create_key

    barrier.wait()
    try:
        out.put(load_or_create_key(None, Path(path)))
    except Exception as err:  # the old code raised FileExistsError in one of two
        out.put(type(err).__name__)


def test_processes_starting_at_once_share_one_whole_key(tmp_path: Path) -> None:
    """Replicas starting together on a machine with no key yet: each gets the one key written, never
    an empty key read from a file still being written, never an error (both happened, 1 and 147
    times in 200 pairs)."""
    import multiprocessing

    from dicomops.deid.keys import load_or_create_key

    context = multiprocessing.get_context("fork")
    for trial in range(15):
        path = tmp_path / f"t{trial}" / "deid.key"
        barrier, out = context.Barrier(3), context.Queue()
        workers = [context.Process(target=_first_start, args=(str(path), barrier, out)) for _ in range(3)]
        for w in workers:
            w.start()
        got = [out.get(timeout=30) for _ in workers]
        for w in workers:
            w.join()
        assert len(set(got)) == 1 and isinstance(got[0], bytes) and len(got[0]) == 64, got
        assert got[0] == path.read_text().strip().encode() and oct(path.stat().st_mode & 0o777) == "0o600"
        assert [p.name for p in path.parent.iterdir()] == ["deid.key"]  # no scratch file left
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        load_or_create_key(None, empty)


def test_free_text_patient_fields_urls_unknown_elements_and_stray_file_meta_leave(deid: Deidentifier) -> None:
    """What a helper found kept word for word: free-text patient fields the Retain Patient
    Characteristics option cleans (C) or does not cover (AdditionalPatientHistory, X), as a real
    RIS writes them (deid-data's Siemens files carry "RIS COMMENTS- ..." there); a RetrieveURL
    holding the original study UID; an element no dictionary knows; file meta beyond what a reader
    needs (the RTV instance UID, the sender's network address)."""
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(to_bytes(_rich_slice())))
    study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
    ds.AdditionalPatientHistory = "seizure; MRN 48444612 typed by the RIS"
    ds.Allergies = "ALLERGY-NEEDLE penicillin"
    ds.SpecialNeeds = "SPECIAL-NEEDLE wheelchair"
    ds.PatientState = "STATE-NEEDLE sedated"
    ds.SmokingStatus = "NO"  # K in the option: kept
    ds.RetrieveURL = f"https://pacs.example/dicomweb/studies/{study}"
    ds.add_new(0x00101234, "UN", b"UNKNOWN^NEEDLE")
    ds.file_meta.RTVCommunicationSOPInstanceUID = sop
    ds.file_meta.SourcePresentationAddress = "dicom://ct-room3.hospital.example:104"
    deid.dataset(ds)
    out = pydicom.filebase.DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    raw = out.getvalue()
    for needle in (study, sop, "48444612", "ALLERGY-NEEDLE", "SPECIAL-NEEDLE", "STATE-NEEDLE", "UNKNOWN^NEEDLE",
                   "hospital.example", "pacs.example"):
        assert needle.encode() not in raw, needle
    back = pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw))
    assert back.SmokingStatus == "NO" and back.PatientAge == "063Y"
    assert set(back.file_meta.dir()) == {"FileMetaInformationGroupLength", "FileMetaInformationVersion",
                                         "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID",
                                         "TransferSyntaxUID", "ImplementationClassUID", "ImplementationVersionName"}
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID


def test_a_padded_or_multi_valued_patient_id_is_one_patient_everywhere(deid: Deidentifier) -> None:
    """Leading spaces in an LO are not significant, and pydicom returns several values as a list:
    the de-identified file named such a patient otherwise than the gate's index (and shifted their
    dates by another offset), two pseudonyms for one patient."""
    mapper = KeyedMapper(KEY)
    padded = ct_slice(PatientID=" MRN-7 ", StudyDate="20240102")
    several = ct_slice(StudyDate="20240102")
    several.PatientID = ["MRN-7", "OLD-7"]
    assert deid.dataset(padded).PatientID == mapper.pseudonym("MRN-7") == mapper.pseudonym("MRN-7\x00")
    assert padded.StudyDate == mapper.shift_date("20240102", "MRN-7")
    assert deid.dataset(several).PatientID == mapper.pseudonym("MRN-7\\OLD-7") == mapper.pseudonym(" MRN-7\\OLD-7 ")
