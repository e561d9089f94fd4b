"""The gate's tables read back as written, files without a preamble de-identified, and the losses at
de-identification counted and judged.

Each test builds a small synthetic corpus (fixed seed, 128 × 128, 8 slices per series) and runs the
gate in this process (``workers=1``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomops import ingest
from dicomops.config import DeidConfig, IngestConfig, SynthConfig
from dicomops.deid import KeyedMapper
from dicomops.errors import GateFailedError
from dicomops.synthetic import generate_corpus

KEY = b"gate-fixes-key-0123456789abcdef01"
# Names pandas parses as numbers (000009 → 9) or as missing values when a table is read without
# types; a table holding only such names is read wrong whole.
KEPT = [f"{n:06d}" for n in range(1, 9)]
THICK = [f"{n:06d}" for n in range(9, 17)]
MISSING = ["NA", "null", "NaN", "nan", "NULL", "None", "#NA", "<NA>"]
LOST = [f"{n:06d}" for n in range(17, 25)]


def _corpus(out: Path, patients: int, seed: int = 3) -> list[list[Path]]:
    """A clean synthetic corpus; the files of each series, one list per series."""
    generate_corpus(out, SynthConfig(patients=patients, seed=seed, fault_rate=0.0, matrix=128, slices=8, workers=1))
    series = sorted(p for p in out.glob("case-*/series-*") if p.is_dir())
    return [sorted(f for f in s.iterdir() if f.is_file()) for s in series]


def _flat(series: list[list[Path]], names: list[list[str]], src: Path, thick: int | None = None) -> Path:
    """The series copied into one flat folder under the given names, as many exports are laid out;
    series number `thick` gets SliceThickness 7 mm (outside the critical range 0.5–5 mm)."""
    src.mkdir()
    for i, (files, chosen) in enumerate(zip(series, names, strict=True)):
        for f, name in zip(files, chosen, strict=True):
            ds = pydicom.dcmread(f)
            if i == thick:
                ds.SliceThickness = "7"
            ds.save_as(src / name)
    return src


def _table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.mark.parametrize("names", [THICK, MISSING], ids=["numbers", "missing-values"])
def test_files_named_like_numbers_or_missing_values_end_where_the_gate_sent_them(
        names: list[str], tmp_path: Path) -> None:
    src = _flat(_corpus(tmp_path / "corpus", 2), [KEPT, names], tmp_path / "src", thick=1)
    work = tmp_path / "work"
    summary = ingest.run(src, work, IngestConfig(workers=1, max_invalid_fraction=1.0), KEY)

    accepted = pd.read_parquet(work / "ingest/accepted.parquet")
    assert sorted(accepted.source_path) == KEPT  # the 7 mm series was accepted as well before
    quarantine = _table(work / "ingest/quarantine.csv")
    assert sorted(quarantine.source_path) == sorted(names)  # not 9, 10, … nor empty
    assert set(quarantine.reason) == {"expectation:slice_thickness_range"}
    assert (summary.files, summary.accepted_files, summary.quarantined_files) == (16, 8, 8)

    # The token MLflow shows each file by is the token of its own name, not of the name parsed.
    shared_path = ingest.shared_quarantine(work, KEY)
    mapper = KeyedMapper(KEY)
    quarantine = _table(work / "ingest/quarantine.csv")
    assert list(quarantine.file) == [mapper.token("file", p) for p in quarantine.source_path]
    assert sorted(quarantine.source_path) == sorted(names)  # rewritten with the tokens, names intact
    shared = _table(shared_path)
    assert sorted(shared.file) == sorted(mapper.token("file", p) for p in names)


def _without_preamble(ds: pydicom.Dataset, keep_meta: bool) -> bytes:
    """`ds` as older writers store it: no preamble and no DICM; its file meta group first, or no file
    meta at all and the dataset in explicit VR, a transfer syntax only the reader's guess names."""
    if keep_meta:
        buffer = DicomBytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()[132:]
    ds = ds.copy()
    del ds.file_meta
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def test_files_without_a_preamble_are_deidentified_into_proper_files(tmp_path: Path) -> None:
    [files] = _corpus(tmp_path / "corpus", 1)
    src = tmp_path / "src"
    (src / "s").mkdir(parents=True)
    originals, syntax = {}, {}
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        rel = f"s/{f.name}"
        (src / rel).write_bytes(_without_preamble(ds, keep_meta=i % 2 == 0))
        originals[rel] = ds.pixel_array
        syntax[rel] = ds.file_meta.TransferSyntaxUID if i % 2 == 0 else ExplicitVRLittleEndian
    work = tmp_path / "work"
    summary = ingest.run(src, work, IngestConfig(workers=1, max_invalid_fraction=0.0), KEY)

    index = pd.read_parquet(work / "ingest/index.parquet")
    assert index.warnings.str.contains("no_preamble").all() and len(index) == 8
    assert _table(work / "ingest/quarantine.csv").empty  # every file was deid_failed before
    accepted = pd.read_parquet(work / "ingest/accepted.parquet")
    assert sorted(accepted.source_path) == sorted(originals)
    assert (summary.accepted_files, summary.quarantined_files, summary.accepted_series) == (8, 0, 1)
    for row in accepted.itertuples():
        data = (work / "deid" / row.deid_path).read_bytes()
        assert data[:128] == bytes(128) and data[128:132] == b"DICM"  # a PS3.10 file, preamble zeroed
        out = pydicom.dcmread(work / "deid" / row.deid_path)  # without force
        assert out.file_meta.TransferSyntaxUID == syntax[row.source_path]
        assert out.file_meta.MediaStorageSOPClassUID == out.SOPClassUID
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID == row.SOPInstanceUID
        assert out.PatientID == row.PatientID and out.PatientID.startswith("PX-")
        assert np.array_equal(out.pixel_array, originals[row.source_path])


def _losing_a_file_after_the_gate(monkeypatch: pytest.MonkeyPatch, lost: Path) -> None:
    """Make a file vanish between the gate and de-identification (a site's export still being
    moved): its series, accepted by the gate, is then lost at de-identification (``deid_failed``)."""
    gate = ingest.apply_gate

    def apply_gate_then_lose(work: Path, cfg: IngestConfig) -> ingest.GateSummary:
        summary = gate(work, cfg)
        lost.unlink()
        return summary

    monkeypatch.setattr(ingest, "apply_gate", apply_gate_then_lose)


def test_series_lost_at_deidentification_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _flat(_corpus(tmp_path / "corpus", 3), [KEPT, THICK, LOST], tmp_path / "src", thick=1)
    _losing_a_file_after_the_gate(monkeypatch, src / LOST[3])
    work = tmp_path / "work"
    summary = ingest.run(src, work, IngestConfig(workers=1, max_invalid_fraction=1.0), KEY)

    assert summary.reasons == {"expectation:slice_thickness_range": 8, "deid_failed": 8}
    assert (summary.files, summary.accepted_files, summary.quarantined_files, summary.accepted_series) == (24, 8, 16, 1)
    assert summary.quarantined_share == pytest.approx(16 / 24)
    written = pd.read_json(work / "ingest/summary.json", typ="series")
    assert (written.accepted_files, written.quarantined_files, written.accepted_series) == (8, 16, 1)
    metrics = ingest.ingest_metrics(work)
    assert metrics["quarantine.deid_failed"] == 8 and metrics["ingest.accepted_files"] == 8
    quarantine = _table(work / "ingest/quarantine.csv")  # re-read and rewritten by de-identification
    assert dict(zip(quarantine.source_path, quarantine.reason, strict=True)) == \
        {**dict.fromkeys(THICK, "expectation:slice_thickness_range"), **dict.fromkeys(LOST, "deid_failed")}
    assert sorted(pd.read_parquet(work / "ingest/accepted.parquet").source_path) == KEPT


def test_the_gate_fails_when_deidentification_loses_too_much(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _flat(_corpus(tmp_path / "corpus", 2), [KEPT, LOST], tmp_path / "src")
    _losing_a_file_after_the_gate(monkeypatch, src / LOST[0])
    work = tmp_path / "work"
    with pytest.raises(GateFailedError, match=r"8 of 16 files quarantined \(50\.0%\).*Top reasons: deid_failed \(8\)"):
        ingest.run(src, work, IngestConfig(workers=1, max_invalid_fraction=0.2), KEY)

    written = pd.read_json(work / "ingest/summary.json", typ="series")
    assert (written.accepted_files, written.quarantined_files, bool(written.passed)) == (8, 8, False)
    # refused as a batch refused before de-identification: no corpus for a later stage to read
    assert not (work / "ingest/accepted.parquet").exists() and not (work / "deid").exists()
    assert len(_table(work / "ingest/quarantine.csv")) == 8


def test_numeric_patient_ids_keep_their_zeros_in_labels_and_the_reid_table(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    _corpus(corpus, 2)
    labels = _table(corpus / "labels.csv")
    new = {old: f"000{1001 + i}" for i, old in enumerate(sorted(set(labels.PatientID)))}
    labels.assign(PatientID=labels.PatientID.map(new)).to_csv(corpus / "labels.csv", index=False)
    for f in corpus.glob("case-*/series-*/*"):
        ds = pydicom.dcmread(f)
        ds.PatientID = new[ds.PatientID]
        ds.save_as(f)
    for name in ("phi.csv", "faults.csv", "corpus.json"):  # the generator's own records, not a site's
        (corpus / name).unlink(missing_ok=True)
    work, reid = tmp_path / "work", tmp_path / "site" / "reid.csv"
    cfg = IngestConfig(workers=1, deid=DeidConfig(reid_key_path=str(reid)))
    ingest.run(corpus, work, cfg, KEY)
    ingest.write_reid_key(corpus, work, cfg, KEY)

    mapper = KeyedMapper(KEY)
    expected = {mapper.pseudonym(p) for p in ("0001001", "0001002")}
    assert set(pd.read_parquet(work / "ingest/accepted.parquet").PatientID) == expected
    rekeyed = _table(work / "deid/labels.csv")
    assert set(rekeyed.PatientID) == expected and len(rekeyed) == 2  # not the pseudonyms of 1001, 1002
    table = _table(reid)
    assert sorted(table.PatientID) == ["0001001", "0001002"]
    assert set(table.pseudonym) == expected
