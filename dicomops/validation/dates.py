"""The StudyDate rule, judged on the original value inside the worker that reads the header.

The header index carries StudyDate shifted 8–10 years back (de-identification), so a rule on the
indexed value judges the shift instead of the file: a valid ``19010101`` becomes ``18911031``. The
worker therefore judges the original value and only its verdict, a word from a closed set, travels
on in the column ``StudyDate_verdict``; the expectation ``study_date_format`` checks that column.
Neither the original value nor the shifted one ever reaches the Data Docs or a quarantine detail.

This module is imported by worker processes: keep it free of heavy imports.
"""

from __future__ import annotations

import datetime as dt

STUDY_DATE_VERDICT = "StudyDate_verdict"
VALID, EMPTY = "valid", "empty"
ACCEPTED = (VALID, EMPTY)  # a Type 2 date may be empty; when present it must be a valid date
NOT_JUDGED = "not_judged"
# Plausible study years, as the rule on the raw value always was (``^(19|20)\d{2}...``).
MIN_YEAR, MAX_YEAR = 1900, 2099

# Verdict -> what the failing value is, in words; quarantine details are built from these only.
DA_VERDICTS: dict[str, str] = {
    VALID: "a valid DICOM DA date",
    EMPTY: "empty (allowed: StudyDate is Type 2)",
    "not_da": "not a valid DICOM DA date (YYYYMMDD)",
    "year_out_of_range": f"a DICOM DA date outside the years {MIN_YEAR}-{MAX_YEAR}",
    NOT_JUDGED: "not judged by the header reader (rebuild the header index)",
}
# Verdict column -> the DICOM keyword it judges.
VERDICT_COLUMNS: dict[str, str] = {STUDY_DATE_VERDICT: "StudyDate"}


def da_verdict(value: str | None) -> str:
    """Judge a DA value: ``valid``, ``empty``, ``not_da`` or ``year_out_of_range``.

    Valid means exactly eight digits ``YYYYMMDD`` naming a real calendar day (PS3.5 6.2) in a
    plausible year; trailing padding is ignored. The value itself is never returned.
    """
    text = (value or "").strip()
    if not text:
        return EMPTY
    if len(text) != 8 or not text.isascii() or not text.isdigit():
        return "not_da"
    try:
        date = dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return "not_da"
    return VALID if MIN_YEAR <= date.year <= MAX_YEAR else "year_out_of_range"


def verdict_detail(column: str, verdict: object) -> str | None:
    """The quarantine detail for a failing verdict in `column`, or None if `column` holds no verdicts."""
    keyword = VERDICT_COLUMNS.get(column)
    if keyword is None:
        return None
    what = DA_VERDICTS.get(verdict if isinstance(verdict, str) else NOT_JUDGED, DA_VERDICTS["not_da"])
    return f"{keyword}: {what}"
