"""Expectations judge the values the scanner wrote, not their de-identified shift, and never leak them.

A real file dated 19010101 (a common anonymiser date) used to be shifted to 1891 before the
suite's ``^(19|20)`` rule saw it, and was quarantined. The rule now runs on the original value in
the worker; only the verdict reaches the table, the quarantine detail and the Data Docs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
import pytest

from dicomops import ingest
from dicomops.config import IngestConfig
from dicomops.deid import KeyedMapper
from dicomops.layout import WorkLayout
from dicomops.validation.dates import STUDY_DATE_VERDICT, da_verdict
from dicomops.validation.suite import STUDY_DATE_EXPECTATION
from tests.hostile import ct_slice

KEY = b"expectations-test-key-0123456789abcdef"
PATIENT = "REALDATE-PID-7731"
NAME = "QUINCEY^MORRIS"
GOOD_DATE = "19010101"
# file name -> original StudyDate -> expected verdict; the values are the test's PHI needles
BAD_DATES = {
    "bad-month.dcm": ("2024-13-45", "not_da"),
    "letters.dcm": ("abc", "not_da"),
    "no-day.dcm": ("20241345", "not_da"),
    "feb-30.dcm": ("20230230", "not_da"),
    "year-5.dcm": ("00050101", "year_out_of_range"),
}
DETAIL = {"not_da": "StudyDate: not a valid DICOM DA date (YYYYMMDD)",
          "year_out_of_range": "StudyDate: a DICOM DA date outside the years 1900-2099"}


@pytest.mark.parametrize(("value", "verdict"), [
    ("19010101", "valid"), ("20991231", "valid"), ("20240229", "valid"), ("20240102 ", "valid"),
    ("18991231", "year_out_of_range"), ("21000101", "year_out_of_range"), ("20230229", "not_da"),
    ("2024-01-02", "not_da"), ("2024.01.02", "not_da"), ("202401", "not_da"), ("２０２４０１０２", "not_da"),
    ("", "empty"), ("  ", "empty"), (None, "empty"),
])
def test_da_verdict_judges_the_original_value(value: str | None, verdict: str) -> None:
    assert da_verdict(value) == verdict


def test_a_valid_date_is_still_valid_after_any_shift() -> None:
    """The bug: every valid date of 1900-1909 left the shift in the 1890s and failed the old rule."""
    mapper = KeyedMapper(KEY)
    shifted = {mapper.shift_date(GOOD_DATE, f"P{i}") for i in range(50)}
    assert all(s.startswith("189") for s in shifted) and len(shifted) > 10
    assert mapper.shift_date("00050101", PATIENT) == "malformed"  # no OverflowError out of the worker


def _write(path: Path, z: float, study_date: str, series: str, **extra: object) -> None:
    ds = ct_slice(z=z, PatientID=PATIENT, PatientName=NAME, SeriesInstanceUID=series,
                  StudyInstanceUID="1.2.826.0.1.3680043.99.1", **extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid DA values on purpose
        ds.StudyDate = study_date
        ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ingest.GateSummary]:
    src, work = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("work")
    for i in range(10):
        _write(src / "good" / f"{i:03d}.dcm", float(i), GOOD_DATE, "1.2.826.0.1.3680043.99.1.1")
    for j, (name, (value, _)) in enumerate(BAD_DATES.items()):
        _write(src / "bad" / name, float(j), value, "1.2.826.0.1.3680043.99.1.2")
    cfg = IngestConfig(workers=1, max_invalid_fraction=1.0)
    return work, ingest.run(src, work, cfg, KEY)


def test_a_19010101_series_is_accepted(gated: tuple[Path, ingest.GateSummary]) -> None:
    work, gate = gated
    accepted = pd.read_parquet(WorkLayout(work).ingest.accepted)
    assert gate.accepted_files == 10 and gate.accepted_series == 1
    assert set(accepted[STUDY_DATE_VERDICT]) == {"valid"}
    shifted = set(accepted["StudyDate"])
    assert len(shifted) == 1 and GOOD_DATE not in shifted and shifted.pop().startswith("189")


def test_malformed_dates_are_quarantined_with_a_detail_that_names_no_value(
        gated: tuple[Path, ingest.GateSummary]) -> None:
    work, _ = gated
    quarantine = pd.read_csv(WorkLayout(work).ingest.quarantine, keep_default_na=False)
    rows = {Path(r.source_path).name: (r.reason, r.detail) for r in quarantine.itertuples()}
    assert rows == {name: (f"expectation:{STUDY_DATE_EXPECTATION}", DETAIL[verdict])
                    for name, (_, verdict) in BAD_DATES.items()}
    text = WorkLayout(work).ingest.quarantine.read_text()
    for value, _ in BAD_DATES.values():
        assert value not in text


def test_no_phi_value_reaches_the_data_docs_or_the_reports(gated: tuple[Path, ingest.GateSummary]) -> None:
    work, _ = gated
    layout = WorkLayout(work).ingest
    pages = list(Path(layout.docs).rglob("*.html"))
    assert pages and any(STUDY_DATE_VERDICT in p.read_text(errors="ignore") for p in pages)
    mapper = KeyedMapper(KEY)
    needles = [PATIENT, "QUINCEY", "MORRIS", GOOD_DATE, mapper.shift_date(GOOD_DATE, PATIENT),
               "1.2.826.0.1.3680043.99.1", "2024-13-45", "20241345", "20230230", "00050101"]
    texts = [p for p in Path(work).rglob("*") if p.is_file() and p.suffix in {".html", ".json", ".csv"}]
    assert texts
    for path in texts:
        content = path.read_text(errors="ignore")
        leaked = [n for n in needles if n in content]
        assert not leaked, f"{path.relative_to(work)} shows {leaked}"
