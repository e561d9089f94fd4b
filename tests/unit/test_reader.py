"""The safe header reader: hostile files, pydicom's own odd files, non-regular files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from pydicom.data import get_testdata_files

from dicomops import ingest
from dicomops.config import IngestConfig
from dicomops.dicom.reader import ReadLimits, inspect_file, list_files
from tests.hostile import ct_slice, executable_preamble, to_bytes, write_hostile_folder

KEY = b"unit-test-key-0123456789abcdef"


def test_every_hostile_file_is_quarantined_with_its_reason(tmp_path: Path) -> None:
    expected = write_hostile_folder(tmp_path / "src")
    ingest.index_headers(tmp_path / "src", tmp_path / "work", IngestConfig(workers=2), KEY)
    quarantine = pd.read_csv(tmp_path / "work/ingest/quarantine_headers.csv", keep_default_na=False)
    got = dict(zip(quarantine.source_path, quarantine.reason, strict=True))
    assert got == expected  # the directory and the FIFO were never opened, nor listed
    index = pd.read_parquet(tmp_path / "work/ingest/index.parquet")
    assert index.empty


def test_regular_files_only_and_symlinks_followed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "outside.dcm").write_bytes(to_bytes(ct_slice()))
    os.symlink(tmp_path / "outside.dcm", src / "link.dcm")
    os.symlink(tmp_path / "missing.dcm", src / "dangling.dcm")
    (src / "series.dcm").mkdir()
    (src / "series.dcm" / "inner.dcm").write_bytes(to_bytes(ct_slice()))
    os.mkfifo(src / "fifo")
    assert [rel for _, rel in list_files(src)] == ["link.dcm", "series.dcm/inner.dcm"]


def test_executable_preamble_is_accepted_but_flagged(tmp_path: Path) -> None:
    path = tmp_path / "mz.dcm"
    path.write_bytes(executable_preamble())
    row = inspect_file(str(path), "mz.dcm", KEY, ReadLimits())
    assert row["reason"] is None and row["executable_preamble"] is True


def test_row_is_deidentified_and_typed(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    path.write_bytes(to_bytes(ct_slice(z=12.5)))
    row = inspect_file(str(path), "a.dcm", KEY, ReadLimits())
    assert row["reason"] is None
    assert row["PatientID"].startswith("PX-") and "HOSTILE" not in str(row.values())
    assert row["StudyDate"] != "20240102" and len(row["StudyDate"]) == 8
    assert row["SeriesInstanceUID"].startswith("2.25.") and row["SeriesInstanceUID"] != "1.2.3.4.5"
    assert row["ImagePositionPatient_2"] == 12.5 and row["PixelSpacing_1"] == 0.7
    assert row["Rows"] == 16 and row["BitsStored"] == 12 and row["RescaleIntercept"] == -1024.0
    assert "PatientName" not in row


@pytest.mark.parametrize("missing", ["ImagePositionPatient", "PatientID", "RescaleSlope"])
def test_missing_required_tag(tmp_path: Path, missing: str) -> None:
    ds = ct_slice()
    delattr(ds, missing)
    path = tmp_path / "m.dcm"
    path.write_bytes(to_bytes(ds))
    assert inspect_file(str(path), "m.dcm", KEY, ReadLimits())["reason"] == f"missing_tag:{missing}"


def test_pixel_data_length_mismatch(tmp_path: Path) -> None:
    ds = ct_slice()
    ds.PixelData = ds.PixelData[:100]
    path = tmp_path / "short.dcm"
    path.write_bytes(to_bytes(ds))
    assert inspect_file(str(path), "short.dcm", KEY, ReadLimits())["reason"] == "pixel_data_length"


def test_pydicom_test_files_never_crash_the_run(tmp_path: Path) -> None:
    """About 190 real-world files (many odd): each accepted or quarantined, none lost."""
    src = tmp_path / "pydicom"
    src.mkdir()
    for i, f in enumerate(p for p in get_testdata_files() if Path(p).is_file()):
        shutil.copy(f, src / f"{i:03d}_{Path(f).name}")
    cfg = IngestConfig(workers=2)
    ingest.index_headers(src, tmp_path / "work", cfg, KEY)
    ingest.validate_headers(tmp_path / "work", cfg)
    ingest.assemble(tmp_path / "work", cfg)
    summary = ingest.apply_gate(tmp_path / "work", cfg.model_copy(update={"max_invalid_fraction": 1.0}))
    quarantine = pd.read_csv(tmp_path / "work/ingest/quarantine.csv", keep_default_na=False)
    accepted = pd.read_parquet(tmp_path / "work/ingest/instances.parquet")
    files = {rel for _, rel in list_files(src)}
    assert set(quarantine.source_path) | set(accepted.source_path) == files
    assert set(quarantine.source_path).isdisjoint(accepted.source_path)
    assert summary.files == len(files) > 150
    reasons = set(quarantine.reason)
    assert {"not_dicom", "wrong_modality"} <= reasons
    assert not any(r in ("worker_crashed", "timeout") for r in reasons)


def test_fast_reader_agrees_with_the_pydicom_path(faulty_corpus: Path, clean_corpus: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomops.dicom import reader
    from dicomops.dicom.fastheader import read_fast

    files = [(str(p), p.name) for root in (faulty_corpus, clean_corpus)
             for p in sorted(root.glob("case-*/series-1/*"))]
    files += [(p, Path(p).name) for p in get_testdata_files() if Path(p).is_file()]
    limits = ReadLimits()
    fast_rows = [inspect_file(f, rel, KEY, limits) for f, rel in files]
    used_fast = sum(read_fast(f, reader.WANTED_KEYWORDS, Path(f).stat().st_size) is not None for f, _ in files)
    monkeypatch.setattr(reader, "read_fast", lambda *a: None)
    slow_rows = [inspect_file(f, rel, KEY, limits) for f, rel in files]
    assert used_fast > 200  # the comparison is not vacuous
    for (f, _), fast, slow in zip(files, fast_rows, slow_rows, strict=True):
        assert fast == slow, f
