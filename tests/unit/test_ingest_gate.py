"""The gate on synthetic corpora: every injected fault caught with its reason, nothing else lost."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pydicom
import pytest

from dicomops import ingest
from dicomops.config import IngestConfig
from dicomops.deid import KeyedMapper
from dicomops.errors import GateFailedError

KEY = b"gate-test-key-0123456789abcdef012"
EXPECTED_REASON = {
    "truncated": "truncated", "not_dicom": "not_dicom", "duplicated_slice": "duplicate_instance",
    "corrupt_pixel_data": "pixel_data_length", "missing_slice": "geometry:gap",
    "inconsistent_spacing": "geometry:pixel_spacing", "wrong_modality": "wrong_modality",
}


def _run(src: Path, work: Path, cfg: IngestConfig) -> ingest.GateSummary:
    ingest.index_headers(src, work, cfg, KEY)
    ingest.validate_headers(work, cfg)
    ingest.assemble(work, cfg)
    return ingest.apply_gate(work, cfg)


def _expected(faults: pd.DataFrame) -> dict[str, str]:
    return {row.path: (f"missing_tag:{row.detail}" if row.fault == "missing_tag" else EXPECTED_REASON[row.fault])
            for row in faults.itertuples()}


def test_every_injected_fault_is_quarantined_with_the_right_reason(faulty_corpus: Path, tmp_path: Path) -> None:
    cfg = IngestConfig(workers=2, max_invalid_fraction=1.0)
    summary = _run(faulty_corpus, tmp_path, cfg)
    faults = pd.read_csv(faulty_corpus / "faults.csv", keep_default_na=False)
    quarantine = pd.read_csv(tmp_path / "ingest/quarantine.csv", keep_default_na=False)
    assert dict(zip(quarantine.source_path, quarantine.reason, strict=True)) == _expected(faults)
    sidecars = set(pd.read_csv(tmp_path / "ingest/sidecars.csv").source_path)
    assert {"labels.csv", "faults.csv", "phi.csv", "corpus.json"} <= sidecars
    accepted = pd.read_parquet(tmp_path / "ingest/instances.parquet")
    assert summary.files == len(accepted) + len(quarantine)
    # Series whose fault hit one edge slice are kept without it.
    file_level = faults[faults.scope == "file"].SeriesInstanceUID.map(KeyedMapper(KEY).uid)
    assert set(file_level) <= set(accepted.SeriesInstanceUID)


def test_no_clean_series_is_quarantined_and_the_gate_fails_on_too_much(
        clean_corpus: Path, faulty_corpus: Path, tmp_path: Path) -> None:
    summary = _run(clean_corpus, tmp_path / "clean", IngestConfig(workers=1))
    assert summary.quarantined_files == 0 and summary.accepted_series == 8 and summary.passed
    with pytest.raises(GateFailedError, match=r"Top reasons: wrong_modality \(24\), geometry:pixel_spacing \(24\)") as err:
        _run(faulty_corpus, tmp_path / "faulty", IngestConfig(workers=1, max_invalid_fraction=0.2))
    assert "--max-invalid-fraction" in str(err.value)


def test_deidentified_corpus_labels_and_masks(mixed_corpus: Path, tmp_path: Path) -> None:
    cfg = IngestConfig(workers=2)
    _run(mixed_corpus, tmp_path, cfg)
    ingest.deidentify_corpus(mixed_corpus, tmp_path, cfg, KEY)
    ingest.rekey_labels(mixed_corpus, tmp_path, KEY)
    accepted = pd.read_parquet(tmp_path / "ingest/accepted.parquet")
    labels = pd.read_csv(tmp_path / "deid/labels.csv", keep_default_na=False)
    assert set(labels.SeriesInstanceUID) == set(accepted.SeriesInstanceUID)
    assert labels.PatientID.str.startswith("PX-").all()
    for row in labels.itertuples():
        assert (tmp_path / "deid" / row.mask_path).exists()
    first = accepted.iloc[0]
    ds = pydicom.dcmread(tmp_path / "deid" / first.deid_path)
    assert ds.SOPInstanceUID == first.SOPInstanceUID and ds.PatientID == first.PatientID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.PatientIdentityRemoved == "YES" and "PatientAddress" not in ds
    assert ds.pixel_array.shape == (128, 128)
    # every slice index present once per series, in geometric order
    for _, group in accepted.groupby("SeriesInstanceUID"):
        assert sorted(group.slice_index) == list(range(len(group)))


def test_a_batch_without_one_readable_file_is_quarantined_not_crashed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text("not an image")
    (src / "empty.dcm").write_bytes(b"")
    with pytest.raises(GateFailedError, match=r"2 of 2 files quarantined \(100.0%\).*Top reasons: not_dicom \(2\)"):
        _run(src, tmp_path / "work", IngestConfig(workers=1))
    quarantine = pd.read_csv(tmp_path / "work/ingest/quarantine.csv", keep_default_na=False)
    assert dict(zip(quarantine.source_path, quarantine.reason, strict=True)) == {"notes.txt": "not_dicom",
                                                                                  "empty.dcm": "not_dicom"}


def test_an_empty_source_says_so_and_suggests_no_threshold(tmp_path: Path) -> None:
    """0 of 0 files was 'above the allowed 100.0%; raise --max-invalid-fraction', which cannot help."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "labels.csv").write_text("SeriesInstanceUID,label\n")  # a sidecar only
    with pytest.raises(GateFailedError) as failed:
        ingest.run(src, tmp_path / "work", IngestConfig(workers=1, max_invalid_fraction=1.0), KEY)
    for said in (str(failed.value), failed.value.brief):
        assert "holds no files to ingest" in said and "max" not in said and "0 of 0" not in said


def test_a_work_directory_inside_the_source_is_not_ingested_as_data(tmp_path: Path) -> None:
    """`dicomops ingest s --work s/work` quarantined the lock, the ledger and the rest as not_dicom,
    and, its hash changing each time, was never skipped."""
    from dicomops.dicom.reader import list_files

    src = tmp_path / "src"
    (src / "work" / "privacy").mkdir(parents=True)
    (src / "work" / ".lock").write_text("")
    (src / "work" / "privacy" / "ledger.json").write_text("{}")
    (src / "case" / "a").mkdir(parents=True)
    (src / "case" / "a" / "1.dcm").write_bytes(b"x")
    assert [rel for _, rel in list_files(src, skip=src / "work")] == ["case/a/1.dcm"]
    assert len(list_files(src)) == 3
    with pytest.raises(GateFailedError):  # the one file is no DICOM; the work files are not counted
        ingest.run(src, src / "work", IngestConfig(workers=1, max_invalid_fraction=0.0), KEY)
    quarantine = pd.read_csv(src / "work" / "ingest" / "quarantine.csv", keep_default_na=False)
    assert quarantine.source_path.tolist() == ["case/a/1.dcm"]
