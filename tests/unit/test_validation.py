"""The Great Expectations suite: failures found, critical rows named, Data Docs built and PHI-free."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dicomops.validation import ExpectationSpec, default_expectations, validate_table
from dicomops.validation.suite import REQUIRED_COLUMNS


def _table(n: int = 4) -> pd.DataFrame:
    row = {c: "x" for c in REQUIRED_COLUMNS}
    row.update({"PatientID": "PX-AAAA", "Modality": "CT", "PixelSpacing_0": 0.7, "PixelSpacing_1": 0.7,
                "SliceThickness": 1.0, "KVP": 120.0, "BitsStored": 12, "RescaleSlope": 1.0,
                "StudyDate": "20150102", "StudyDate_verdict": "valid", "Rows": 512, "Columns": 512})
    rows = []
    for i in range(n):
        r = dict(row)
        r["SOPInstanceUID"] = f"2.25.{i}"
        rows.append(r)
    return pd.DataFrame(rows)


def test_clean_table_passes_every_expectation(tmp_path: Path) -> None:
    outcome = validate_table(_table(), default_expectations(), tmp_path / "docs")
    assert outcome.success and outcome.success_share == 1.0 and not outcome.failed_rows
    assert outcome.docs_index is not None and outcome.docs_index.exists()
    assert len(outcome.table) == len(default_expectations())


def test_missing_tag_and_bad_values_fail_their_expectations(tmp_path: Path) -> None:
    table = _table(5)
    table.loc[1, "PatientID"] = None
    table.loc[2, "SliceThickness"] = 10.0
    table.loc[3, "KVP"] = 200.0  # a warning: reported, never quarantined
    table.loc[4, "StudyDate_verdict"] = "not_da"
    outcome = validate_table(table, default_expectations(), tmp_path / "docs")
    assert not outcome.success
    assert outcome.failed_rows == {"required_PatientID": [1], "slice_thickness_range": [2],
                                   "study_date_format": [4]}
    assert outcome.failed_details == {
        "required_PatientID": {1: "PatientID: missing or empty"},
        "slice_thickness_range": {2: "SliceThickness: a number outside the range (at least 0.5, at most 5)"},
        "study_date_format": {4: "StudyDate: not a valid DICOM DA date (YYYYMMDD)"}}
    failed = outcome.table.set_index("expectation")
    assert not failed.loc["kvp_range", "success"] and not failed.loc["kvp_range", "critical"]
    assert outcome.success_share == 1 - 4 / len(default_expectations())


def test_a_failing_warning_is_reported_but_does_not_fail_the_run(tmp_path: Path) -> None:
    table = _table(3)
    table.loc[2, "SOPInstanceUID"] = table.loc[0, "SOPInstanceUID"]  # a duplicate UID: a warning
    table.loc[1, "KVP"] = 200.0  # a warning too
    outcome = validate_table(table, default_expectations(), tmp_path / "docs")
    assert outcome.success and not outcome.failed_rows and not outcome.failed_details
    failed = outcome.table[~outcome.table.success]
    assert sorted(failed.expectation) == ["kvp_range", "sop_instance_uid_unique"]
    assert not failed.critical.any()
    assert outcome.success_share == 1 - 2 / len(default_expectations())


def test_gx_carries_each_expectations_level_as_its_severity() -> None:
    from dicomops.validation.suite import _gx_expectation

    levels = {s.name: _gx_expectation(s).severity.value for s in default_expectations()}
    assert levels["kvp_range"] == levels["sop_instance_uid_unique"] == "warning"
    assert levels["required_PatientID"] == levels["study_date_format"] == "critical"
    assert sorted(set(levels.values())) == ["critical", "warning"]


def test_a_column_absent_from_the_table_fails_instead_of_crashing(tmp_path: Path) -> None:
    spec = ExpectationSpec(name="required_Foo", kind="not_null", column="Foo")
    outcome = validate_table(_table(2), [spec], tmp_path / "docs")
    assert outcome.failed_rows == {"required_Foo": [0, 1]}


def test_data_docs_sample_unexpected_values_from_the_table(tmp_path: Path) -> None:
    """Data Docs print unexpected values, which is why the gate validates the de-identified table."""
    table = _table(3)
    table.loc[0, "Modality"] = "MR"
    validate_table(table, default_expectations(), tmp_path / "docs")
    pages = list((tmp_path / "docs" / "validations").rglob("*.html"))
    assert len(pages) == 1
    html = pages[0].read_text(errors="ignore")
    assert "MR" in html and "Modality" in html


def test_the_suite_allows_exactly_the_configured_modalities(tmp_path: Path) -> None:
    from dicomops.config import IngestConfig
    from dicomops.validation.suite import ALLOWED_MODALITIES, MODALITY_EXPECTATION

    def allowed(cfg: IngestConfig) -> set[str]:
        (spec,) = [s for s in cfg.expectations if s.name == MODALITY_EXPECTATION]
        return set(spec.value_set or ())

    assert allowed(IngestConfig()) == set(IngestConfig().allowed_modalities) == set(ALLOWED_MODALITIES) == {"CT"}
    both = IngestConfig.model_validate({"allowed_modalities": ["CT", "PT"]})
    assert allowed(both) == {"CT", "PT"}
    table = _table(2)
    table.loc[1, "Modality"] = "PT"
    assert validate_table(table, IngestConfig().expectations, tmp_path / "ct").failed_rows == {
        MODALITY_EXPECTATION: [1]}
    assert validate_table(table, both.expectations, tmp_path / "ct-pt").success
    try:
        IngestConfig.model_validate({"allowed_modalities": ["CT", "PT"],
                                     "expectations": [s.model_dump() for s in default_expectations()]})
    except ValueError as err:
        assert "allowed_modalities" in str(err)
    else:
        raise AssertionError("a suite that disagrees with allowed_modalities must be refused")
