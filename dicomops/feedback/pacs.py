"""Readers' feedback from the PACS: a reader's verified revision of a dicomops report.

A viewer that edits structured reports (OHIF's SR tools, 3D Slicer's) stores a reader's judgement
of an AI result as a new SR in the same study that names the report it revises in its Predecessor
Documents Sequence and, once the reader signs it, is VERIFIED by them (Verifying Observer Name). The
reader accepts the result by signing it unchanged, and corrects it by changing the finding's
present/absent evaluation. :func:`collect_once` follows Orthanc's changes feed (its own cursor),
finds each such revision in a study that became stable, checks the reader is a configured
reviewer, links the analysed series to the training pool by its keyed pseudonym and stores the
item. Every report it looks at is recorded with its outcome (``feedback/pacs_seen.csv``, by token):
a revision by an unknown reader, or one it cannot read, is refused with a reason, never dropped
silently; dicomops's own reports are recorded as such and never looked at again. A reader's
corrected segmentation (a SEG, :mod:`dicomops.feedback.seg`) is taken in the same pass.

:func:`revise` writes such a revision, as a viewer would: the tests, and the demo's simulated
readers, use it.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from dicomops import io
from dicomops.deid.keys import KeyedMapper
from dicomops.feedback.review import latest_localisation, latest_result
from dicomops.feedback.store import FeedbackStore, Reviewers, UnknownReaderError, make_item
from dicomops.layout import WorkLayout
from dicomops.pacs.client import PacsRequestRefused
from dicomops.pacs.results import ABSENT, FINDING_TYPE, MANUFACTURER, PRESENT, SCORE, SERIES_SCORE

SEEN_COLUMNS = ["report", "outcome", "reason", "at"]
# An object (or study) a viewer stored under a UID the DICOMweb client will not put in a request.
NOT_REQUESTABLE = "uid_not_requestable"


@dataclass(frozen=True)
class Report:
    """What a dicomops report says: the analysed series (original UID: memory only), the call."""

    sop_uid: str
    series_uid: str
    model: str
    version: str
    present: bool
    score: float


@dataclass(frozen=True)
class Assessment:
    """A reader's revision of a report: who signed it, their call, which report it revises."""

    reader: str
    present: bool
    predecessor: str
    at: dt.datetime | None


def _items(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _named(item: Dataset, code: Any) -> bool:
    name = item.get("ConceptNameCodeSequence")  # a long or URN code (legal DICOM) has no CodeValue: not ours
    return (bool(name) and name[0].get("CodeValue") == code.value
            and name[0].get("CodingSchemeDesignator") == code.scheme_designator)


def _finding(ds: Dataset) -> bool | None:
    """The series finding's present/absent evaluation (the first in the tree: the series group)."""
    for item in _items(ds):
        if item.get("ValueType") == "CODE" and _named(item, FINDING_TYPE):
            value = item.ConceptCodeSequence[0]
            for code, answer in ((PRESENT, True), (ABSENT, False)):
                if value.get("CodeValue") == code.value and value.get("CodingSchemeDesignator") == code.scheme_designator:
                    return answer
    return None


def _score(ds: Dataset) -> float | None:
    for item in _items(ds):
        if item.get("ValueType") == "NUM" and (_named(item, SCORE) or _named(item, SERIES_SCORE)):
            return float(item.MeasuredValueSequence[0].NumericValue)
    return None


def read_report(ds: Dataset) -> Report | None:
    """A dicomops report's content, or None for any other SR. A revision is never ours, whatever its
    Manufacturer says (a viewer that copies the report into its revision may keep ours): it names
    a predecessor, or is verified, and dicomops writes neither."""
    if (str(ds.get("Manufacturer", "")) != MANUFACTURER or "PredecessorDocumentsSequence" in ds
            or str(ds.get("VerificationFlag", "")) == "VERIFIED"):
        return None
    present, score = _finding(ds), _score(ds)
    evidence = ds.get("CurrentRequestedProcedureEvidenceSequence")
    if present is None or score is None or not evidence:
        return None
    series = str(evidence[0].ReferencedSeriesSequence[0].SeriesInstanceUID)
    return Report(str(ds.SOPInstanceUID), series, str(ds.get("ManufacturerModelName", "")),
                  str(ds.get("SoftwareVersions", "")), present, score)


def read_assessment(ds: Dataset) -> Assessment | str:
    """A reader's verified revision of a report, or why this SR is not one (a reason to record)."""
    predecessors = ds.get("PredecessorDocumentsSequence")
    if not predecessors:
        return "not_a_revision"
    if str(ds.get("VerificationFlag", "")) != "VERIFIED" or not ds.get("VerifyingObserverSequence"):
        return "not_verified"
    observer = ds.VerifyingObserverSequence[0]
    if not str(observer.get("VerifyingObserverName", "")).strip():
        return "no_verifying_observer_name"
    present = _finding(ds)
    if present is None:
        return "no_finding_evaluation"
    try:
        sop = str(predecessors[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    except (AttributeError, IndexError):
        return "bad_predecessor_reference"
    when = dicom_time(str(observer.get("VerificationDateTime", "")), ds)
    return Assessment(str(observer.VerifyingObserverName), present, sop, when)


def dicom_time(value: str, ds: Dataset) -> dt.datetime | None:
    """A DICOM date-time (DT: ``YYYYMMDDHHMMSS.FFFFFF&ZZXX``) in UTC: its own offset when it has one,
    else the object's Timezone Offset From UTC (0008,0201), else taken as UTC; None when it is not
    one. A reader's judgement's time orders it against their others and places it in the window."""
    from pydicom.valuerep import DT

    if not value.strip():
        return None
    try:
        when = DT(value.strip())
    except ValueError:  # a malformed offset: the date and time, taken as UTC
        try:
            when = DT(value.strip()[:14])
        except ValueError:
            return None
    moment = dt.datetime(when.year, when.month, when.day, when.hour, when.minute, when.second, when.microsecond,
                         tzinfo=when.tzinfo)
    if moment.tzinfo is None:
        offset = str(ds.get("TimezoneOffsetFromUTC", "")).strip()
        try:
            zone = DT(f"20000101000000{offset}").tzinfo if offset else None
        except ValueError:
            zone = None
        moment = moment.replace(tzinfo=zone or dt.UTC)
    return moment.astimezone(dt.UTC)


def revise(report: Dataset, present: bool, reader: str, organization: str = "dicomops demo hospital",
           viewer: str = "dicomops review") -> Dataset:
    """A reader's verified revision of `report` (a dicomops SR) with their call, as a viewer writes it:
    a new SR in a new series of the same study, naming the report as its predecessor."""
    ds = copy.deepcopy(report)
    now = dt.datetime.now(dt.UTC)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(report.get("SeriesNumber", 9001)) + 1
    ds.SeriesDescription = f"Reader review ({viewer})"[:64]
    ds.Manufacturer = viewer
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.VerificationFlag, ds.PreliminaryFlag, ds.CompletionFlag = "VERIFIED", "FINAL", "COMPLETE"
    observer = Dataset()
    observer.VerifyingObserverName = reader
    observer.VerifyingOrganization = organization
    observer.VerificationDateTime = now.strftime("%Y%m%d%H%M%S")
    observer.VerifyingObserverIdentificationCodeSequence = DicomSequence([])
    ds.VerifyingObserverSequence = DicomSequence([observer])
    sop = Dataset()
    sop.ReferencedSOPClassUID = report.SOPClassUID
    sop.ReferencedSOPInstanceUID = report.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = report.SeriesInstanceUID
    series.ReferencedSOPSequence = DicomSequence([sop])
    study = Dataset()
    study.StudyInstanceUID = report.StudyInstanceUID
    study.ReferencedSeriesSequence = DicomSequence([series])
    ds.PredecessorDocumentsSequence = DicomSequence([study])
    for item in _items(ds):
        if item.get("ValueType") == "CODE" and _named(item, FINDING_TYPE):
            code = PRESENT if present else ABSENT
            value = item.ConceptCodeSequence[0]
            value.CodeValue, value.CodingSchemeDesignator, value.CodeMeaning = \
                code.value, code.scheme_designator, code.meaning
            break
    return ds


def _seen(work: Path) -> pd.DataFrame:
    path = WorkLayout(work).feedback.pacs_seen
    return pd.read_csv(path, keep_default_na=False) if path.exists() else pd.DataFrame(columns=SEEN_COLUMNS)


def _record(work: Path, rows: list[dict[str, str]]) -> None:
    if not rows:
        return
    path = WorkLayout(work).feedback.pacs_seen
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=60):
        io.write_csv(path, pd.concat([_seen(work), pd.DataFrame(rows, columns=SEEN_COLUMNS)], ignore_index=True))


def collect_study(study_uid: str, pacs: Any, work: Path, key: bytes, reviewers: Reviewers) -> list[dict[str, str]]:
    """Every report of the study not seen before: readers' revisions stored as feedback, the rest
    recorded with why not. Returns the records (tokens, outcomes, reasons; no UID)."""
    mapper = KeyedMapper(key)
    seen = set(_seen(work).report)
    fresh = [(series, sop) for series, sop in pacs.report_instances(study_uid)
             if mapper.token("report", sop) not in seen]
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    rows, items = [], []
    datasets = {}
    for series, sop in fresh:
        fetched = _requestable(pacs.retrieve_instance, study_uid, series, sop)
        if fetched is None:
            rows.append({"report": mapper.token("report", sop), "outcome": "refused", "reason": NOT_REQUESTABLE,
                         "at": now})
        else:
            datasets[sop] = fetched
    ours = {sop: r for sop, ds in datasets.items() if (r := _readable(read_report, ds, None)) is not None}
    for sop, ds in datasets.items():
        token = mapper.token("report", sop)
        if sop in ours:
            rows.append({"report": token, "outcome": "ours", "reason": "", "at": now})
            continue
        assessment = _readable(read_assessment, ds, "unreadable_sr")
        reason = assessment if isinstance(assessment, str) else ""
        report = None
        if not reason:
            assert isinstance(assessment, Assessment)
            report = ours.get(assessment.predecessor) or _requestable(_known_report, pacs, study_uid,
                                                                       assessment.predecessor)
            if report is None:
                reason = "revises_no_dicomops_report"
        if not reason:
            assert isinstance(assessment, Assessment) and report is not None
            try:
                role = reviewers.role(assessment.reader)
            except UnknownReaderError:
                reason = "unknown_reader"
        if reason:
            rows.append({"report": token, "outcome": "refused", "reason": reason, "at": now})
            continue
        assert isinstance(assessment, Assessment) and report is not None
        series = mapper.uid(report.series_uid)
        served = latest_result(work, series)
        items.append(make_item(reader=assessment.reader, role=role, source="pacs-sr",
                               verdict="accept" if assessment.present == report.present else "correct",
                               series=series, vendor=served.manufacturer if served else "unknown",
                               model=report.model, version=report.version, model_label=int(report.present),
                               model_score=report.score, reader_label=int(assessment.present),
                               ref=token, at=assessment.at))
        rows.append({"report": token, "outcome": "stored", "reason": "", "at": now})
    seg_rows, seg_items = _collect_segmentations(study_uid, pacs, work, mapper, reviewers, seen, now)
    FeedbackStore(work).add([*items, *seg_items])  # before the reports are marked seen: a crash repeats, never loses
    _record(work, [*rows, *seg_rows])
    return [*rows, *seg_rows]


def _requestable(fetch: Callable[..., Any], *args: Any) -> Any:
    """`fetch(*args)`, or None for an object the DICOMweb client will not ask the PACS for (a UID a
    viewer wrote that is not a valid DICOM UID: asking again gets the same answer), so that one
    reader's odd object is recorded (:data:`NOT_REQUESTABLE`) instead of stopping every pass at its
    study. An outage still raises."""
    try:
        return fetch(*args)
    except PacsRequestRefused:
        return None


def _readable(read: Callable[[Dataset], Any], ds: Dataset, unreadable: str | None) -> Any:
    """`read` of one object a reader stored, or, when it cannot follow it (a structure legal in DICOM
    that it does not expect), the reason `unreadable` with the error's type (None: no reason, the
    object is not ours). One odd object is recorded and never stops the collection of those behind
    it; the error's message is not kept, it may quote the object's values."""
    try:
        return read(ds)
    except Exception as err:
        return None if unreadable is None else f"{unreadable} ({type(err).__name__})"


def _collect_segmentations(study_uid: str, pacs: Any, work: Path, mapper: KeyedMapper, reviewers: Reviewers,
                           seen: set[str], now: str) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """The study's new SEGs: a configured reviewer's corrected segmentation of a series the platform
    answered becomes an item with its mask (``FeedbackPaths.mask``); the rest are recorded."""
    from dicomops.feedback.seg import is_ours, mask_dice, read_correction, reader_mask

    rows: list[dict[str, str]] = []
    items: list[dict[str, Any]] = []
    for series_of_seg, sop in pacs.segmentation_instances(study_uid):
        token = mapper.token("seg", sop)
        if token in seen:
            continue
        ds = _requestable(pacs.retrieve_instance, study_uid, series_of_seg, sop)
        if ds is None:
            rows.append({"report": token, "outcome": "refused", "reason": NOT_REQUESTABLE, "at": now})
            continue
        if is_ours(ds):
            rows.append({"report": token, "outcome": "ours", "reason": "", "at": now})
            continue
        correction = _readable(read_correction, ds, "unreadable_seg")
        reason, role, served = (correction, "", None) if isinstance(correction, str) else ("", "", None)
        if not reason:
            assert not isinstance(correction, str)
            try:
                role = reviewers.role(correction.reader)
            except UnknownReaderError:
                reason = "unknown_reader"
        if not reason:
            assert not isinstance(correction, str)
            served = latest_result(work, mapper.uid(correction.series_uid))
            reason = "" if served is not None else "no_dicomops_result"
        if not reason:
            assert not isinstance(correction, str) and served is not None
            headers = _requestable(pacs.series_headers, study_uid, correction.series_uid)  # outages raise
            reason = NOT_REQUESTABLE if headers is None else ""
            try:
                drawn = reader_mask(ds, headers) if headers is not None else None
            except ValueError:
                reason = "mask_not_over_its_series"
            except Exception as err:  # highdicom cannot follow it: as _readable records it
                reason = f"unreadable_seg ({type(err).__name__})"
        if reason:
            rows.append({"report": token, "outcome": "refused", "reason": reason, "at": now})
            continue
        assert not isinstance(correction, str) and served is not None and drawn is not None
        relative = WorkLayout(work).feedback.mask(token)
        drawn.save(WorkLayout(work).feedback.root / relative)
        label, series = int(bool(drawn.nodules)), mapper.uid(correction.series_uid)
        items.append(make_item(reader=correction.reader, role=role, source="pacs-seg", verdict="correct",
                               series=series, vendor=served.manufacturer,
                               model=served.model, version=served.version, model_label=int(served.present),
                               model_score=served.score, reader_label=label, ref=token, at=correction.at,
                               changed=_changed(len(drawn.nodules), int(served.present), label), mask=relative))
        localised = latest_localisation(work, series)
        if localised is not None:  # the segmenter's mask is what the reader corrected: judged with it
            dice = mask_dice(localised.mask, WorkLayout(work).feedback.root / relative) \
                if localised.mask.is_file() else math.nan
            items.append(make_item(reader=correction.reader, role=role, source="pacs-seg", verdict="correct",
                                   series=series, vendor=served.manufacturer, model=localised.model,
                                   version=localised.version, model_label=int(localised.present),
                                   model_score=localised.score, reader_label=label, ref=f"{token}/segmenter",
                                   at=correction.at, mask=relative, dice=dice,
                                   changed=_changed(len(drawn.nodules), int(localised.present), label)))
        rows.append({"report": token, "outcome": "stored", "reason": "", "at": now})
    return rows, items


def _changed(nodules: int, said: int, label: int) -> str:
    return f"mask of {nodules} nodules" + (f"; label {said} \u2192 {label}" if label != said else "")


def _known_report(pacs: Any, study_uid: str, sop: str) -> Report | None:
    """The dicomops report a revision names, when it was seen in an earlier pass."""
    for series, candidate in pacs.report_instances(study_uid):
        if candidate == sop:
            return read_report(pacs.retrieve_instance(study_uid, series, sop))
    return None


def collect_once(feed: Any, pacs: Any, work: Path, key: bytes, reviewers: Reviewers,
                 limit: int = 100) -> list[dict[str, str]]:
    """Every study that became stable since the feedback cursor (``WORK/feedback/cursor.json``):
    its new reports collected, the cursor advanced after each study."""
    from dicomops.pacs.changes import Cursor

    cursor = Cursor(WorkLayout(work).feedback.cursor)
    rows: list[dict[str, str]] = []
    cursor.follow(feed)  # a feed that starts again below the cursor is read from its start
    while True:
        since = cursor.value
        page = feed.poll(since, limit)
        for study in page.studies:
            try:
                rows.extend(collect_study(study.study_uid, pacs, work, key, reviewers))
            except PacsRequestRefused:  # the study's own UID: none of its objects can be asked for
                refused = [{"report": KeyedMapper(key).token("study", study.study_uid), "outcome": "refused",
                            "reason": f"{NOT_REQUESTABLE} (the study)",
                            "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}]
                _record(work, refused)
                rows.extend(refused)
            cursor.advance(study.seq)
        cursor.advance(page.last)
        if page.done or page.last <= since:
            return rows


def collect_pacs(orthanc_url: str | None, work: Path, key: bytes, reviewers: Reviewers, http_budget_s: float,
                 limit: int = 100) -> list[dict[str, str]]:
    """One pass of :func:`collect_once` against the Orthanc at `orthanc_url` (default
    ``DICOMOPS_PACS_URL``), credentials from the environment."""
    from dicomops.pacs.watch import pacs_and_feed

    with pacs_and_feed(orthanc_url, http_budget_s) as (pacs, feed):
        return collect_once(feed, pacs, work, key, reviewers, limit)
