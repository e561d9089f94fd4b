"""Inputs a site really sends through the gate: identities in other character sets, file names that
are not UTF-8, symlinked folders, DICOMDIRs, deflated and mislabelled files, colour and non-HU
"CT", and labels.csv files with empty, escaping or repeated rows.

Each test builds what it needs from a small synthetic corpus (fixed seed, 128 × 128, 8 slices per
series) or pydicom's CT_small.dcm, and runs the gate in this process (``workers=1``).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicomops import ingest
from dicomops.config import IngestConfig, SynthConfig
from dicomops.deid import KeyedMapper
from dicomops.dicom import reader
from dicomops.dicom.reader import ReadLimits, inspect_file, list_files
from dicomops.errors import GateFailedError
from dicomops.synthetic import generate_corpus

KEY = b"gate-inputs-key-0123456789abcdef0"
MAPPER = KeyedMapper(KEY)


def _corpus(out: Path, patients: int = 2, seed: int = 3) -> list[Path]:
    """A clean synthetic corpus without the generator's own records; its series folders, sorted."""
    generate_corpus(out, SynthConfig(patients=patients, seed=seed, fault_rate=0.0, matrix=128, slices=8, workers=1))
    for name in ("phi.csv", "faults.csv", "corpus.json"):
        (out / name).unlink(missing_ok=True)
    return sorted(p for p in out.glob("case-*/series-*") if p.is_dir())


def _table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _rewrite(folder: Path, change: Callable[[pydicom.Dataset], object]) -> None:
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        change(ds)
        ds.save_as(f)


def _gate_tables(work: Path) -> str:
    """Every table and summary the gate wrote, as text (parquet read back), for leak checks."""
    texts = []
    for path in sorted((work / "ingest").rglob("*")):
        if path.suffix == ".parquet":
            texts.append(pd.read_parquet(path).to_csv())
        elif path.suffix in (".csv", ".json"):
            texts.append(path.read_text())
    texts.append(_table(work / "deid/labels.csv").to_csv() if (work / "deid/labels.csv").exists() else "")
    return "\n".join(texts)


def _ct_small() -> pydicom.Dataset:
    return pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))


def _inspect(tmp_path: Path, data: bytes, name: str = "x.dcm") -> dict[str, object]:
    path = tmp_path / name
    path.write_bytes(data)
    return inspect_file(str(path), name, KEY, ReadLimits())


def _to_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --- identities in another character set --------------------------------------------------------------

@pytest.mark.parametrize(("charset", "patient"), [("ISO_IR 192", "MÜLLER4711"), ("GB18030", "王小明4711")])
def test_a_non_ascii_patient_id_is_one_patient_everywhere(charset: str, patient: str, tmp_path: Path) -> None:
    """The index decoded every value as latin-1, the de-identifier and labels.csv as the file's
    character set and UTF-8: one patient had two pseudonyms and two date shifts."""
    src = tmp_path / "src"
    first, _ = _corpus(src)
    labels = _table(src / "labels.csv")
    original_date = pydicom.dcmread(next(first.iterdir())).StudyDate

    def set_identity(ds: pydicom.Dataset) -> None:
        ds.SpecificCharacterSet, ds.PatientID = charset, patient

    _rewrite(first, set_identity)
    labels.loc[labels.series_dir == first.relative_to(src).as_posix(), "PatientID"] = patient
    labels.to_csv(src / "labels.csv", index=False)
    work = tmp_path / "work"
    ingest.run(src, work, IngestConfig(workers=1, max_invalid_fraction=0.0), KEY)

    pseudonym = MAPPER.pseudonym(patient)
    accepted = pd.read_parquet(work / "ingest/accepted.parquet")
    mine = accepted[accepted.source_path.str.startswith(first.relative_to(src).as_posix())]
    assert set(mine.PatientID) == {pseudonym} and len(mine) == 8
    assert set(mine.StudyDate) == {MAPPER.shift_date(original_date, patient)}
    for rel in mine.deid_path:
        out = pydicom.dcmread(work / "deid" / rel)
        assert out.PatientID == pseudonym and out.StudyDate == mine.StudyDate.iloc[0]
    assert pseudonym in set(_table(work / "deid/labels.csv").PatientID)
    assert patient not in _gate_tables(work)


def test_the_fast_and_the_pydicom_path_decode_a_patient_id_alike(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _ct_small()
    ds.SpecificCharacterSet, ds.PatientID = "ISO_IR 192", "MÜLLER4711"
    data = _to_bytes(ds)
    fast = _inspect(tmp_path, data, "fast.dcm")
    monkeypatch.setattr(reader, "read_fast", lambda *a: None)
    slow = _inspect(tmp_path, data, "slow.dcm")
    assert fast["PatientID"] == slow["PatientID"] == MAPPER.pseudonym("MÜLLER4711")


# --- file names that are not UTF-8 --------------------------------------------------------------------

def test_a_file_name_that_is_not_utf8_is_read_and_named_safely(tmp_path: Path) -> None:
    """One such name crashed the whole batch (UnicodeEncodeError writing index.parquet)."""
    src = tmp_path / "src"
    first, _ = _corpus(src)
    victim = sorted(first.iterdir())[3]
    os.rename(victim, os.path.join(os.fsencode(first), b"caf\xe9_latin1.dcm"))
    work = tmp_path / "work"
    summary = ingest.run(src, work, IngestConfig(workers=1, max_invalid_fraction=0.0), KEY)

    shown = f"{first.relative_to(src).as_posix()}/caf\\xe9_latin1.dcm"
    assert (summary.files, summary.accepted_files, summary.quarantined_files) == (16, 16, 0)
    accepted = pd.read_parquet(work / "ingest/accepted.parquet")
    assert shown in set(accepted.source_path)
    assert os.path.isfile(reader.source_file(src, shown))
    row = accepted[accepted.source_path == shown].iloc[0]
    assert pydicom.dcmread(work / "deid" / row.deid_path).PatientID == row.PatientID


def test_a_non_utf8_name_that_reads_as_another_name_is_quarantined(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "caf\\xe9.dcm").write_text("a text file whose name holds a backslash")
    with open(os.path.join(os.fsencode(src), b"caf\xe9.dcm"), "w") as fh:
        fh.write("a text file whose name is latin-1")
    ingest.index_headers(src, tmp_path / "work", IngestConfig(workers=1), KEY)
    quarantine = _table(tmp_path / "work/ingest/quarantine_headers.csv")
    assert sorted(quarantine.reason) == ["bad_file_name", "not_dicom"]
    assert json.loads((tmp_path / "work/ingest/files.json").read_text()) == {"files": 2}


# --- labels.csv -----------------------------------------------------------------------------------------

def test_an_empty_mask_path_means_no_mask(tmp_path: Path) -> None:
    """`Path(src) / ""` is the folder: IsADirectoryError after de-identification, naming the source."""
    src = tmp_path / "src"
    _corpus(src)
    labels = _table(src / "labels.csv")
    labels.loc[0, "mask_path"] = ""
    labels.to_csv(src / "labels.csv", index=False)
    work = tmp_path / "work"
    ingest.run(src, work, IngestConfig(workers=1), KEY)

    rekeyed = _table(work / "deid/labels.csv").set_index("SeriesInstanceUID")
    assert rekeyed.loc[MAPPER.uid(labels.SeriesInstanceUID[0]), "mask_path"] == ""
    kept = rekeyed.loc[MAPPER.uid(labels.SeriesInstanceUID[1]), "mask_path"]
    assert kept and (work / "deid" / kept).is_file()


@pytest.mark.parametrize("escape", ["absolute", "climbing"])
def test_a_mask_path_outside_the_source_folder_is_refused(escape: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _corpus(src)
    secret = tmp_path / "secret-MRN12345.npz"
    secret.write_bytes(b"not the site's to copy")
    labels = _table(src / "labels.csv")
    labels.loc[1, "mask_path"] = str(secret) if escape == "absolute" else "masks/../../secret-MRN12345.npz"
    labels.to_csv(src / "labels.csv", index=False)
    work = tmp_path / "work"
    with pytest.raises(ValueError, match=r"mask_path of rows 2 points outside the source folder") as err:
        ingest.run(src, work, IngestConfig(workers=1), KEY)
    assert "MRN12345" not in str(err.value) and str(tmp_path) not in str(err.value)
    assert not (work / "ingest/index.parquet").exists()  # refused before any file was read
    with pytest.raises(ValueError, match="outside the source folder"):  # and by the step that copies masks
        ingest.rekey_labels(src, work, KEY)


def test_a_series_labelled_twice_is_refused_unless_the_rows_are_the_same(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Both passed the gate, and preprocessing crashed on `labels.loc[uid, ...]` returning a Series."""
    src = tmp_path / "src"
    _corpus(src)
    labels = _table(src / "labels.csv")
    pd.concat([labels, labels.iloc[[0]]]).to_csv(src / "labels.csv", index=False)
    work = tmp_path / "work"
    with caplog.at_level(logging.WARNING, logger="dicomops.ingest"):
        ingest.run(src, work, IngestConfig(workers=1), KEY)
    rekeyed = _table(work / "deid/labels.csv")
    assert len(rekeyed) == 2 and rekeyed.SeriesInstanceUID.is_unique
    assert "row(s) repeat an earlier row word for word (rows 3)" in caplog.text

    changed = labels.iloc[[0]].assign(label="1" if labels.label[0] == "0" else "0")
    pd.concat([labels, changed]).to_csv(src / "labels.csv", index=False)
    with pytest.raises(ValueError, match=r"1 series with different rows \(rows 1, 3\).*keep one row per") as err:
        ingest.run(src, tmp_path / "work2", IngestConfig(workers=1), KEY)
    assert labels.SeriesInstanceUID[0] not in str(err.value) and labels.PatientID[0] not in str(err.value)


def test_rows_without_a_series_uid_are_refused_by_number(tmp_path: Path) -> None:
    """Two empty SeriesInstanceUIDs were refused as "1 series with different rows"."""
    src = tmp_path / "src"
    _corpus(src)
    labels = _table(src / "labels.csv")
    second = labels.SeriesInstanceUID[1]
    labels.loc[0, "SeriesInstanceUID"] = ""
    labels.loc[1, "SeriesInstanceUID"] = "  "
    labels.to_csv(src / "labels.csv", index=False)
    with pytest.raises(ValueError, match=r"2 row\(s\) have an empty SeriesInstanceUID \(rows 1, 2\); give each row "
                                         r"the SeriesInstanceUID of its series") as err:
        ingest.check_labels(src)
    assert "different rows" not in str(err.value) and labels.PatientID[0] not in str(err.value)

    labels.loc[1, "SeriesInstanceUID"] = second  # one alone is refused too
    labels.to_csv(src / "labels.csv", index=False)
    with pytest.raises(ValueError, match=r"1 row\(s\) have an empty SeriesInstanceUID \(rows 1\)"):
        ingest.check_labels(src)


# --- deflated and mislabelled transfer syntaxes -----------------------------------------------------------

def test_a_deflated_file_is_read_like_its_inflated_self(tmp_path: Path) -> None:
    """Every valid deflated file was `missing_tag:PixelData`: the pixel element was looked for at an
    offset into the deflated bytes."""
    ds = _ct_small()
    plain = _inspect(tmp_path, _to_bytes(ds), "plain.dcm")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = _inspect(tmp_path, _to_bytes(ds), "deflated.dcm")
    assert deflated["reason"] is None, deflated
    differ = {k for k in plain if plain[k] != deflated[k]}
    assert differ == {"source_path", "file_bytes", "TransferSyntaxUID"}

    ds.PixelData = ds.PixelData[:-200]  # the pixel checks run on the inflated stream too
    assert _inspect(tmp_path, _to_bytes(ds), "short.dcm")["reason"] == "pixel_data_length"
    small = ReadLimits(max_inflated_bytes=20_000)  # and the bound holds
    (tmp_path / "big.dcm").write_bytes(_deflated(_ct_small()))
    assert inspect_file(str(tmp_path / "big.dcm"), "big.dcm", KEY, small)["reason"] == "bad_value:deflate_size"


def _deflated(ds: pydicom.Dataset) -> bytes:
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return _to_bytes(ds)


def test_a_deflated_series_goes_through_the_gate(tmp_path: Path) -> None:
    src = tmp_path / "src"
    first, _ = _corpus(src)
    originals = {f.name: pydicom.dcmread(f).pixel_array for f in first.iterdir()}
    for f in first.iterdir():
        f.write_bytes(_deflated(pydicom.dcmread(f)))
    work = tmp_path / "work"
    summary = ingest.run(src, work, IngestConfig(workers=1, max_invalid_fraction=0.0), KEY)
    assert (summary.accepted_files, summary.accepted_series) == (16, 2)
    accepted = pd.read_parquet(work / "ingest/accepted.parquet")
    mine = accepted[accepted.TransferSyntaxUID == DeflatedExplicitVRLittleEndian]
    assert len(mine) == 8
    for row in mine.itertuples():
        out = pydicom.dcmread(work / "deid" / row.deid_path)
        assert np.array_equal(out.pixel_array, originals[Path(row.source_path).name])


def _implicit_under_explicit_meta(ds: pydicom.Dataset) -> bytes:
    """A dataset written implicit VR behind a file meta that says Explicit VR Little Endian."""
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, True
    write_dataset(body, ds)
    return out.getvalue() + body.getvalue()


def test_an_implicit_dataset_under_an_explicit_file_meta_is_read_as_pydicom_reads_it(tmp_path: Path) -> None:
    """Quarantined as `pixel_data_length`: the pixel element was parsed in the declared encoding."""
    ds = _ct_small()
    plain = _inspect(tmp_path, _to_bytes(ds), "plain.dcm")
    row = _inspect(tmp_path, _implicit_under_explicit_meta(ds), "mislabelled.dcm")
    assert row["reason"] is None, row
    assert row["warnings"] == "vr_encoding_mismatch:implicit"
    assert {k for k in plain if plain[k] != row[k]} == {"source_path", "file_bytes", "warnings"}
    ds.PixelData = ds.PixelData[:-200]
    assert _inspect(tmp_path, _implicit_under_explicit_meta(ds), "short.dcm")["reason"] == "pixel_data_length"

    src = tmp_path / "src"  # and through de-identification into proper files
    first, _ = _corpus(src)
    originals = {f.name: pydicom.dcmread(f).pixel_array for f in first.iterdir()}
    for f in first.iterdir():
        f.write_bytes(_implicit_under_explicit_meta(pydicom.dcmread(f)))
    work = tmp_path / "work"
    assert ingest.run(src, work, IngestConfig(workers=1, max_invalid_fraction=0.0), KEY).accepted_files == 16
    accepted = pd.read_parquet(work / "ingest/accepted.parquet")
    for row in accepted[accepted.warnings != ""].itertuples():
        out = pydicom.dcmread(work / "deid" / row.deid_path)
        assert np.array_equal(out.pixel_array, originals[Path(row.source_path).name])
    assert (accepted.warnings != "").sum() == 8


# --- what is not a file of its own, and what is no image -------------------------------------------------

def test_an_all_quarantined_batch_flows_through_when_allowed(tmp_path: Path) -> None:
    """With max_invalid_fraction 1.0, de-identification crashed on an index without PatientID."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("not dicom")
    (src / "b.dcm").write_bytes(b"")
    work = tmp_path / "work"
    summary = ingest.run(src, work, IngestConfig(workers=1, max_invalid_fraction=1.0), KEY)
    assert (summary.files, summary.accepted_files, summary.quarantined_files, summary.passed) == (2, 0, 2, True)
    accepted = pd.read_parquet(work / "ingest/accepted.parquet")
    assert accepted.empty and {"PatientID", "SeriesInstanceUID", "deid_path", "slice_index"} <= set(accepted.columns)
    assert pd.read_parquet(work / "ingest/series.parquet").empty


def test_the_gate_failure_says_how_to_raise_the_setting_for_every_command(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("not dicom")
    with pytest.raises(GateFailedError) as err:
        ingest.run(src, tmp_path / "work", IngestConfig(workers=1, max_invalid_fraction=0.5), KEY)
    message = str(err.value)
    assert "ingest.max_invalid_fraction to at least 1.00" in message
    assert "`dicomops ingest --max-invalid-fraction 1.00`" in message
    assert "`dicomops run` and `dicomops monitor` a --config YAML with `ingest: {max_invalid_fraction: 1.00}`" \
        in message
    assert "[" not in message  # the CLI prints it as rich markup


def test_a_symlinked_series_folder_is_read_once_and_loops_end(tmp_path: Path) -> None:
    """A series folder linked in from elsewhere was neither read nor counted."""
    src = tmp_path / "src"
    _, second = _corpus(src)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(second.parent, elsewhere)
    os.symlink(elsewhere, second.parent)  # the case folder, now a link
    os.symlink(elsewhere, src / "same-case-again")  # the same folder by a second link: listed once
    os.symlink(src, elsewhere / "loop")  # a link back up the tree
    images = sorted((elsewhere / second.name).iterdir())
    os.symlink(images[0], src / "one-file-again.dcm")  # a file by a second name
    os.link(images[1], src / "hard-link.dcm")  # as a DVC checkout links files of equal content
    work = tmp_path / "work"
    summary = ingest.run(src, work, IngestConfig(workers=1, max_invalid_fraction=0.2), KEY)
    # Every name ends in one place: the file's second names are the same instance again.
    assert (summary.files, summary.accepted_files, summary.quarantined_files) == (18, 16, 2)
    quarantine = pd.read_csv(work / "ingest/quarantine.csv")
    assert sorted(quarantine.reason) == ["duplicate_instance"] * 2
    listed = [rel for _, rel in list_files(src)]
    assert len(listed) == len(set(listed)) == 18 + 3  # the sidecars: labels.csv and two masks
    assert any(rel.startswith(second.relative_to(src).as_posix()) for rel in listed)


def _denied(path: Path, monkeypatch: pytest.MonkeyPatch, code: int = errno.EACCES) -> None:
    """os.scandir, as os.walk calls it, fails on `path` as on a folder without read permission (tests
    run as root, whom chmod does not stop)."""
    real = os.scandir

    def scandir(where: object = ".") -> object:
        if where == str(path):
            raise OSError(code, os.strerror(code), str(path))
        return real(where)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "scandir", scandir)


@pytest.mark.parametrize("how", ["scandir-fails", "chmod"])
def test_a_folder_that_cannot_be_listed_is_quarantined_not_dropped(how: str, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """os.walk skipped a folder it could not list without a word, and the batch passed without its files."""
    if how == "chmod" and os.geteuid() == 0:
        pytest.skip("root lists a folder without read permission; the scandir-fails case covers root")
    src = tmp_path / "src"
    _corpus(src)
    locked = src / "case-late" / "series-9"
    locked.mkdir(parents=True)
    (locked / "1.dcm").write_bytes(_to_bytes(_ct_small()))
    if how == "chmod":
        locked.chmod(0)
    else:
        _denied(locked, monkeypatch)
    work = tmp_path / "work"
    try:
        summary = ingest.run(src, work, IngestConfig(workers=1, max_invalid_fraction=0.1), KEY)
    finally:
        locked.chmod(0o755)
    assert (summary.files, summary.accepted_files, summary.quarantined_files) == (17, 16, 1)
    assert summary.reasons == {"unreadable_folder": 1} and summary.passed
    row = _table(work / "ingest/quarantine.csv").iloc[0]
    assert (row.source_path, row.reason) == ("case-late/series-9", "unreadable_folder")
    assert "Permission denied" in row.detail and str(tmp_path) not in row.detail


def test_a_file_that_cannot_be_looked_at_is_quarantined_but_a_dangling_link_is_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for name in ("a.dcm", "locked.dcm", "sub/b.dcm"):
        (src / name).write_text("not dicom")
    os.symlink(tmp_path / "gone.dcm", src / "dangling.dcm")
    real = os.stat

    def stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if path == str(src / "locked.dcm"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", stat)
    ingest.index_headers(src, tmp_path / "work", IngestConfig(workers=1), KEY)
    quarantine = _table(tmp_path / "work/ingest/quarantine_headers.csv").sort_values("source_path")
    assert list(zip(quarantine.source_path, quarantine.reason, strict=True)) == [
        ("a.dcm", "not_dicom"), ("locked.dcm", "unreadable_file"), ("sub/b.dcm", "not_dicom")]
    assert json.loads((tmp_path / "work/ingest/files.json").read_text()) == {"files": 3}


def test_a_source_that_cannot_be_listed_is_refused_and_an_outage_stops_the_walk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    with monkeypatch.context() as m:
        _denied(src, m)
        with pytest.raises(ValueError, match=r"cannot be listed \(Permission denied\); give this user read access"):
            reader.list_source(src)
    _denied(src / "sub", monkeypatch, errno.EMFILE)  # this machine's limit, not the input's fault
    with pytest.raises(OSError, match="Too many open files"):
        reader.list_source(src)


def test_a_dicomdir_has_its_own_reason(tmp_path: Path) -> None:
    from pydicom.fileset import FileSet

    fs = FileSet()
    fs.add(_ct_small())
    fs.write(tmp_path / "medium")
    row = inspect_file(str(tmp_path / "medium/DICOMDIR"), "DICOMDIR", KEY, ReadLimits())
    assert row["reason"] == "dicomdir" and "not an image" in str(row["detail"])


# --- colour and non-HU "CT" --------------------------------------------------------------------------------

def _rgb(ds: pydicom.Dataset, photometric: str = "RGB") -> pydicom.Dataset:
    pixels = ds.pixel_array
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, photometric, 0
    ds.PixelData = np.repeat(pixels[..., None], 3, axis=-1).tobytes()
    return ds


@pytest.mark.parametrize(("make", "reason", "fragment"), [
    (lambda ds: _rgb(ds), "bad_value:PhotometricInterpretation", "PhotometricInterpretation is RGB"),
    (lambda ds: _rgb(ds, "MÜLLER"), "bad_value:PhotometricInterpretation", "is not a defined term"),
    (lambda ds: _rgb(ds, "MONOCHROME2"), "bad_value:SamplesPerPixel", "SamplesPerPixel is 3"),
], ids=["rgb", "garbled", "three-samples"])
def test_colour_ct_is_quarantined(make: Callable[[pydicom.Dataset], pydicom.Dataset], reason: str, fragment: str,
                                  tmp_path: Path) -> None:
    row = _inspect(tmp_path, _to_bytes(make(_ct_small())))
    assert row["reason"] == reason and fragment in str(row["detail"]) and "MÜLLER" not in str(row["detail"])


def test_a_16_bit_rgb_series_is_not_accepted(tmp_path: Path) -> None:
    src = tmp_path / "src"
    first, _ = _corpus(src)
    _rewrite(first, _rgb)
    summary = ingest.run(src, tmp_path / "work", IngestConfig(workers=1, max_invalid_fraction=1.0), KEY)
    assert summary.reasons == {"bad_value:PhotometricInterpretation": 8} and summary.accepted_series == 1


def test_monochrome1_is_accepted_with_a_warning(tmp_path: Path) -> None:
    ds = _ct_small()
    ds.PhotometricInterpretation = "MONOCHROME1"
    row = _inspect(tmp_path, _to_bytes(ds))
    assert row["reason"] is None and row["warnings"] == "monochrome1"


@pytest.mark.parametrize(("value", "reason", "fragment"), [
    ("US", "rescale_type_not_hu", "RescaleType says US"),
    ("MRN12345", "rescale_type_not_hu", "is not HU (nor a defined term)"),
    ("HU", None, ""),
])
def test_rescale_type_other_than_hu_is_quarantined(value: str, reason: str | None, fragment: str,
                                                   tmp_path: Path) -> None:
    ds = _ct_small()
    ds.RescaleType = value
    row = _inspect(tmp_path, _to_bytes(ds))
    assert row["reason"] == reason and fragment in str(row.get("detail", ""))
    assert "MRN12345" not in str(row)


def test_lossy_compression_in_the_history_is_a_warning(tmp_path: Path) -> None:
    ds = _ct_small()
    ds.LossyImageCompression = "01"
    row = _inspect(tmp_path, _to_bytes(ds))
    assert row["reason"] is None and row["warnings"] == "lossy_compressed"


def test_the_empty_index_has_every_column_of_a_row(tmp_path: Path) -> None:
    row = _inspect(tmp_path, _to_bytes(_ct_small()))
    assert set(row) - {"reason"} == set(reader.INDEX_SCHEMA)


def test_a_mask_path_with_a_windows_drive_is_outside_the_folder() -> None:
    """os.path.splitdrive finds no drive on POSIX: `C:\\masks\\x.npz` passed as inside the folder."""
    from dicomops.ingest import _outside_folder

    assert _outside_folder("C:\\masks\\x.npz") and _outside_folder("../x.npz") and _outside_folder("/x.npz")
    assert not _outside_folder("masks/x.npz") and not _outside_folder("")


def test_a_ct_image_with_several_frames_is_quarantined_at_the_gate() -> None:
    """The gate accepted it and preprocessing failed its whole series later (it read one frame before)."""
    ds = _ct_small()
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "two-frames.dcm"
        ds.save_as(path, enforce_file_format=True)
        row = inspect_file(str(path), "two-frames.dcm", KEY, ReadLimits())
    assert row["reason"] == "bad_value:NumberOfFrames" and "single-frame" in str(row["detail"])
